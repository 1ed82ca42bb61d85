"""Test helpers that mount real scratchfs instances and always take them down again.

Every mount is started through the real CLI (`python -m scratchfs mount`), daemonized, with a
pid file, so teardown can end the daemon by PID and check that nothing is left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from scratchfs.exitcodes import EXIT_BUSY
from scratchfs.keyholder import mountinfo, procs

SCRATCHFS = [sys.executable, "-m", "scratchfs"]


def is_mounted(path: Path) -> bool:
    """True if something is mounted exactly at *path* (the shared mountinfo parser)."""
    return mountinfo.find(path) is not None


def fuse_mounts_under(prefix: str) -> list[str]:
    """Every FUSE mount point at or below *prefix*."""
    return [e.mountpoint for e in mountinfo.under(prefix) if e.fstype.startswith("fuse")]


def pid_alive(pid: int) -> bool:
    """True unless *pid* is gone or a zombie (zombies are dead for our purposes)."""
    return procs.alive(pid)


def wait_pid_gone(pid: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.02)
    return False


@dataclass
class Mounted:
    """A live scratchfs mount started by the tests."""

    backing: Path
    mountpoint: Path
    pid: int
    log_path: Path
    options: list[str] = field(default_factory=list)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def blobs(self) -> list[Path]:
        """Blob files in the backing store (everything but the marker)."""
        return sorted(p for p in self.backing.iterdir() if p.name != ".scratchfs")


def run_cli(*args: str, timeout: float = 60.0, **kw: object) -> subprocess.CompletedProcess[str]:
    """Run `python -m scratchfs ARGS` and capture its output."""
    return subprocess.run(
        [*SCRATCHFS, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kw,  # type: ignore[call-overload]
    )


def mount(backing: Path, mountpoint: Path, *options: str, log_path: Path | None = None) -> Mounted:
    """Mount scratchfs (daemonized, strict mode) and return once the mount is live."""
    backing.mkdir(parents=True, exist_ok=True)
    mountpoint.mkdir(parents=True, exist_ok=True)
    log_path = log_path or mountpoint.parent / f"{mountpoint.name}.log"
    pid_file = mountpoint.parent / f"{mountpoint.name}.pid"
    result = run_cli(
        "mount",
        str(backing),
        str(mountpoint),
        "--strict",
        "--pid-file",
        str(pid_file),
        "--log-file",
        str(log_path),
        *options,
    )
    if result.returncode != 0:
        raise RuntimeError(f"mount failed ({result.returncode}): {result.stderr.strip()}")
    assert is_mounted(mountpoint), "mount returned success but the mount is not live"
    pid = int(pid_file.read_text())
    return Mounted(backing, mountpoint, pid, log_path, list(options))


def _umount_waiting_for_strangers(mountpoint: Path, patience: float = 60.0) -> subprocess.CompletedProcess[str]:
    """`scratchfs umount`, retried while only processes the tests did not start keep it busy.

    Something else on a shared machine can walk into a test's mount (a `find` or `du` over
    /tmp) and hold it busy for a moment; that is not the test's fault. A descriptor or working
    directory of this pytest process or one of its children is, and fails at once.
    """
    deadline = time.monotonic() + patience
    while True:
        r = run_cli("umount", str(mountpoint))
        if r.returncode != EXIT_BUSY or "is busy" not in r.stderr or time.monotonic() >= deadline:
            return r
        users = procs.users_of(str(mountpoint))
        ours = {os.getpid(), *procs.descendants(os.getpid())}
        if not users or set(users) & ours:
            return r
        print(f"unmount of {mountpoint} waits for processes the tests did not start: {users}", file=sys.stderr)
        time.sleep(0.5)


def unmount(m: Mounted, check_log: bool = True) -> None:
    """Unmount cleanly; kill by PID if needed; fail on leftovers or logged errors."""
    problems = []
    if is_mounted(m.mountpoint):
        r = _umount_waiting_for_strangers(m.mountpoint)
        if r.returncode != 0:
            problems.append(f"umount failed: {r.stderr.strip()}")
    if not wait_pid_gone(m.pid):
        problems.append(f"daemon {m.pid} did not exit after unmount")
        os.kill(m.pid, signal.SIGKILL)
        wait_pid_gone(m.pid)
    if is_mounted(m.mountpoint):
        subprocess.run(["fusermount3", "-u", "-z", str(m.mountpoint)], check=False)
        problems.append("mount was still live after umount")
    if check_log:
        log = m.log_text()
        bad = [ln for ln in log.splitlines() if " ERROR " in ln or " CRITICAL " in ln or "Traceback" in ln]
        if bad:
            problems.append("daemon logged errors:\n" + "\n".join(bad[:20]))
    if problems:
        raise AssertionError("; ".join(problems))


@contextmanager
def mounted(backing: Path, mountpoint: Path, *options: str, check_log: bool = True) -> Iterator[Mounted]:
    """Context manager: mount, yield, always unmount."""
    m = mount(backing, mountpoint, *options)
    try:
        yield m
    finally:
        unmount(m, check_log=check_log)
