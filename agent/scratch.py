"""Running scratchfs as a supervised child of the agent, and clearing what a crash left.

scratchfs is started in the foreground (``--foreground --ready-fd``) as the agent's own
child, through ``agent.child`` so that it is killed if the agent dies. The agent waits for
the "ok" on the ready pipe (the mount is live), watches the child through a pidfd, and
unmounts with ``python -m scratchfs umount`` at shutdown. The child's stderr goes to a
log file on the encrypted volume (scratchfs may name files in integrity errors).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import trio

from agent.errors import ScratchFailure

log = logging.getLogger("agent.scratch")

READY_TIMEOUT = 60.0
UMOUNT_TIMEOUT = 60.0
# How the agent mounts its scratch space; the bench's `scratchfs-agent` target uses the same
# tuple, so what is measured is what runs (README "Performance" says why each one).
# --no-xattr: scan engines never use xattrs, and without it every buffered write costs the
#   kernel's extra GETXATTR(security.capability) request.
# --writeback-cache: result files are written in small pieces; the kernel batches them.
# --keep-cache: every result is read back once for upload right after it was written; the
#   kernel's pages serve that read instead of a decryption per block.
SCRATCHFS_OPTIONS: tuple[str, ...] = ("--no-xattr", "--writeback-cache", "--keep-cache")


def mount_entry(path: Path) -> tuple[str, str] | None:
    """(fstype, source) of the mount exactly at *path*, or None."""
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            mnt = fields[4].encode().decode("unicode_escape")
            if mnt == target:
                sep = fields.index("-")
                return fields[sep + 1], fields[sep + 2]
    return None


def is_stale(path: Path) -> bool:
    """True if *path* is a FUSE mount whose server is gone (stat gives ENOTCONN)."""
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


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
    if pid is not None and _alive(pid):
        cmd = _cmdline(pid)
        if "scratchfs" in cmd and str(mountpoint) in cmd:
            log.warning("event=stale_scratchfs pid=%d action=kill", pid)
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            found = True
    pid_file.unlink(missing_ok=True)
    if mount_entry(mountpoint) is not None:
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
        word = b""
        try:
            with trio.move_on_after(READY_TIMEOUT):
                while not word.endswith(b"\n"):
                    await trio.lowlevel.wait_readable(read_fd)
                    chunk = os.read(read_fd, 4096)
                    if not chunk:
                        break
                    word += chunk
        finally:
            os.close(read_fd)
        text = word.decode(errors="replace").strip()
        if text != "ok":
            await self._reap_failed()
            detail = text[4:] if text.startswith("err ") else "no word on the ready pipe"
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
        if self.proc.poll() is None and mount_entry(self.mountpoint) is not None:
            r = await trio.run_process(
                [sys.executable, "-m", "scratchfs", "umount", str(self.mountpoint)],
                capture_stdout=True, capture_stderr=True, check=False,
            )
            if r.returncode != 0:
                log.warning(
                    "event=scratch_umount_failed rc=%d detail=%s",
                    r.returncode, r.stderr.decode(errors="replace").strip()[:200],
                )
        try:
            await trio.to_thread.run_sync(partial(self.proc.wait, timeout=UMOUNT_TIMEOUT))
        except subprocess.TimeoutExpired:
            pass
        if self.proc.poll() is None:
            log.warning("event=scratch_kill pid=%d", self.proc.pid)
            self.proc.kill()
            await trio.to_thread.run_sync(self.proc.wait)
        self._close_pidfd()
        if mount_entry(self.mountpoint) is not None:
            subprocess.run(["umount", "-l", str(self.mountpoint)], check=False)
        self.pid_file.unlink(missing_ok=True)
        log.info("event=scratch_unmounted mountpoint=%s", self.mountpoint)
