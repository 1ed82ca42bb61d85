"""Running scratchfs as a supervised child of the agent, and clearing what a crash left.

scratchfs is started in the foreground (``--foreground --ready-fd``) as the agent's own
child, through ``agent.child`` so that it is killed if the agent dies. The agent waits for
the "ok" on the ready pipe (the mount is live), watches the child through a pidfd, and
unmounts with ``python -m scratchfs umount`` at shutdown. The child's stderr goes to a
log file on the encrypted volume (scratchfs may name files in integrity errors).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import trio

from agent.errors import ScratchFailure
from scratchfs.keyholder import mountinfo, procs, ready

log = logging.getLogger("agent.scratch")

READY_TIMEOUT = 60.0
UMOUNT_TIMEOUT = 60.0
# How the agent mounts its scratch space: scratchfs's `scratch` profile (scratchfs/profiles.py),
# the one the README recommends for local mounts, so that what people run is what the agent
# runs; the bench's `scratchfs-agent` target uses the same tuple, so what is measured is what
# runs. What the profile gives the agent (README "Performance" says more):
# - no xattrs: scan engines never use them, and without them every buffered write costs the
#   kernel's extra GETXATTR(security.capability) request;
# - the writeback cache: result files are written in small pieces; the kernel batches them;
# - keep cache: every result is read back once for upload right after it was written; the
#   kernel's pages serve that read instead of a decryption per block;
# - names and attributes cached for a day: the upload and the shred after it walk thousands of
#   names the scan wrote minutes earlier without a LOOKUP each.
SCRATCHFS_OPTIONS: tuple[str, ...] = ("--profile", "scratch")


def clear_stale(mountpoint: Path, pid_file: Path) -> bool:
    """Stop a scratchfs left by a previous run and detach its mount; True if one was found.

    The pid file is only trusted when the process's command line names scratchfs and this
    mountpoint, so a recycled PID is never signalled.
    """
    found = False
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        pid = None
    started = procs.start_time(pid) if pid is not None else None
    if pid is not None and started is not None:
        cmd = procs.cmdline(pid)
        if "scratchfs" in cmd and str(mountpoint) in cmd:
            log.warning("event=stale_scratchfs pid=%d action=kill", pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            procs.wait_gone(pid, started, 10)
            found = True
    pid_file.unlink(missing_ok=True)
    if mountinfo.find(mountpoint) is not None:
        log.warning("event=stale_scratch_mount mountpoint=%s action=lazy_unmount", mountpoint)
        r = subprocess.run(
            ["umount", "-l", str(mountpoint)], capture_output=True, text=True, check=False
        )
        if r.returncode != 0:
            raise ScratchFailure(
                f"cannot clear the stale scratch mount {mountpoint}: "
                f"{(r.stderr.strip().splitlines() or ['?'])[-1]}"
            )
        found = True
    return found


class ScratchMount:
    """A live scratchfs mount served by a child process of the agent."""

    def __init__(self, backing: Path, mountpoint: Path, pid_file: Path, log_file: Path) -> None:
        self.backing = backing
        self.mountpoint = mountpoint
        self.pid_file = pid_file
        self.log_file = log_file
        self.proc: subprocess.Popen[bytes] | None = None
        self._pidfd: int | None = None
        self.stopping = False

    def __repr__(self) -> str:
        pid = self.proc.pid if self.proc else None
        return f"<ScratchMount {self.mountpoint} pid={pid}>"

    async def start(self) -> None:
        """Start the child and return once the mount is live; raise ScratchFailure."""
        self.backing.mkdir(mode=0o700, exist_ok=True)
        self.mountpoint.mkdir(mode=0o700, exist_ok=True)
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        log_fd = os.open(
            self.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600
        )
        argv = [
            sys.executable, "-m", "agent.child", str(os.getpid()), "--",
            sys.executable, "-m", "scratchfs", "mount", str(self.backing), str(self.mountpoint),
            "--foreground", "--ready-fd", str(write_fd), "--pid-file", str(self.pid_file),
            *SCRATCHFS_OPTIONS,
        ]  # fmt: skip
        try:
            # Popen in the trio thread, not a worker thread: PR_SET_PDEATHSIG fires when
            # the *thread* that forked exits, and trio's worker threads come and go.
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
                pass_fds=(write_fd,), close_fds=True,
            )
        finally:
            os.close(write_fd)
            os.close(log_fd)
        self._pidfd = os.pidfd_open(self.proc.pid)
        try:
            word = await ready.read_word_async(read_fd, READY_TIMEOUT)
        finally:
            os.close(read_fd)
        if not word.ok:
            await self._reap_failed()
            detail = word.message if word.code is not None else f"it {word.message}"
            raise ScratchFailure(f"scratchfs did not mount on {self.mountpoint} ({detail})")
        log.info("event=scratch_mounted mountpoint=%s pid=%d", self.mountpoint, self.proc.pid)

    async def _reap_failed(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
        await trio.to_thread.run_sync(self.proc.wait)
        self._close_pidfd()

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    async def watch(self) -> None:
        """Return normally at shutdown; raise ScratchFailure if scratchfs dies on its own."""
        assert self.proc is not None and self._pidfd is not None
        await trio.lowlevel.wait_readable(self._pidfd)
        rc = self.proc.wait()
        if not self.stopping:
            raise ScratchFailure(f"scratchfs exited unexpectedly with status {rc}")

    async def stop(self) -> None:
        """Unmount (scratchfs shreds every file key) and reap the child."""
        self.stopping = True
        if self.proc is None:
            return
        if self.proc.poll() is None:
            if mountinfo.find(self.mountpoint) is not None:
                r = await trio.run_process(
                    [sys.executable, "-m", "scratchfs", "umount", str(self.mountpoint)],
                    capture_stdout=True, capture_stderr=True, check=False,
                )
                if r.returncode != 0:
                    log.warning(
                        "event=scratch_umount_failed rc=%d detail=%s",
                        r.returncode, r.stderr.decode(errors="replace").strip()[:200],
                    )
            else:
                # Stopped while it was still starting (a SIGTERM cancelled start()'s wait for the
                # ready word): nothing to unmount yet, and nothing would ever ask it to stop. Its
                # SIGTERM handler unmounts and shreds; before the handler exists, the default
                # action ends it, its keys with it, and the lazy unmount below clears a mount it
                # may have left.
                log.info("event=scratch_stop_while_starting pid=%d", self.proc.pid)
                self.proc.terminate()
        try:
            await trio.to_thread.run_sync(partial(self.proc.wait, timeout=UMOUNT_TIMEOUT))
        except subprocess.TimeoutExpired:
            pass
        if self.proc.poll() is None:
            log.warning("event=scratch_kill pid=%d", self.proc.pid)
            self.proc.kill()
            await trio.to_thread.run_sync(self.proc.wait)
        self._close_pidfd()
        if mountinfo.find(self.mountpoint) is not None:
            subprocess.run(["umount", "-l", str(self.mountpoint)], check=False)
        self.pid_file.unlink(missing_ok=True)
        log.info("event=scratch_unmounted mountpoint=%s", self.mountpoint)
