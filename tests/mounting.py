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

SCRATCHFS = [sys.executable, "-m", "scratchfs"]


def is_mounted(path: Path) -> bool:
    """True if *path* is a mount point listed in /proc/self/mountinfo."""
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            mnt = fields[4].encode().decode("unicode_escape")
            if mnt == target:
                return True
    return False


def fuse_mounts_under(prefix: str) -> list[str]:
    """Every FUSE mount point below *prefix*."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            fstype = fields[sep + 1]
            mnt = fields[4]
            if fstype.startswith("fuse") and mnt.startswith(prefix):
                found.append(mnt)
    return found


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


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


def unmount(m: Mounted, check_log: bool = True) -> None:
    """Unmount cleanly; kill by PID if needed; fail on leftovers or logged errors."""
    problems = []
    if is_mounted(m.mountpoint):
        r = run_cli("umount", str(m.mountpoint))
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
