"""Thin wrappers over system tools and /proc: run a command, mounts, processes.

Every failure becomes a ToolError with a one-line message (the tool's last stderr line);
secrets are only ever passed on a command's standard input, never in its arguments.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from pathlib import Path

from scratchfs.volume.errors import BusyError, ToolError

log = logging.getLogger(__name__)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no message"


def run(
    argv: list[str],
    *,
    what: str,
    stdin: bytes | bytearray | None = None,
    timeout: float = 120.0,
    hint: str = "see the system log",
) -> str:
    """Run *argv*; return stdout; raise ToolError('<what> failed: <reason>; <hint>')."""
    log.debug("event=run argv=%s", " ".join(argv))
    try:
        proc = subprocess.run(
            argv,
            input=bytes(stdin) if stdin is not None else None,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError:
        raise ToolError(f"{what} failed: {argv[0]} is not installed; install it") from None
    except subprocess.TimeoutExpired:
        raise ToolError(f"{what} failed: {argv[0]} timed out after {timeout:.0f}s; {hint}") from None
    if proc.returncode != 0:
        reason = _last_line(proc.stderr.decode(errors="replace"))
        if "target is busy" in reason or "busy" in reason.lower():
            raise BusyError(f"{what} failed: {reason}; stop the processes using it and retry")
        raise ToolError(f"{what} failed: {reason}; {hint}")
    return proc.stdout.decode(errors="replace")


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal.
    return field.encode().decode("unicode_escape")


def mounts() -> list[tuple[str, str, str]]:
    """(mountpoint, fstype, source) for every mount visible to this process."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            out.append((_unescape(fields[4]), fields[sep + 1], _unescape(fields[sep + 2])))
    return out


def mount_of(path: Path) -> tuple[str, str] | None:
    """(fstype, source) of the mount at *path*, or None if nothing is mounted there."""
    target = os.path.realpath(path)
    found = None
    for mnt, fstype, source in mounts():
        if mnt == target:
            found = (fstype, source)  # the last one is the visible one
    return found


def is_mounted(path: Path) -> bool:
    """True if something is mounted exactly at *path*."""
    return mount_of(path) is not None


def umount(path: Path, *, what: str, lazy: bool = False) -> None:
    """Unmount *path* (lazily if asked)."""
    argv = ["umount", *(["-l"] if lazy else []), str(path)]
    run(argv, what=what)


def process_start_time(pid: int) -> int | None:
    """Start time of *pid* (field 22 of /proc/PID/stat), to tell it from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    if rest[0] == "Z":
        return None
    return int(rest[19])


def same_process_alive(pid: int, start_time: int) -> bool:
    """True if *pid* is alive and is still the process that started at *start_time*."""
    return process_start_time(pid) == start_time


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def wait_gone(pid: int, start_time: int, timeout: float) -> bool:
    """Wait up to *timeout* seconds for the process to end; True if it did."""
    deadline = time.monotonic() + timeout
    while True:
        _reap(pid)
        if not same_process_alive(pid, start_time):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def stop_process(pid: int, start_time: int, grace: float = 10.0) -> None:
    """End the process *pid* (if still the same one): wait, then SIGTERM, then SIGKILL."""
    if wait_gone(pid, start_time, grace):
        return
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        if not same_process_alive(pid, start_time):
            return
        log.warning("event=stop_process pid=%d signal=%s", pid, sig.name)
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if wait_gone(pid, start_time, wait):
            return
    raise ToolError(f"process {pid} did not stop; kill it by hand")
