"""Is this still the same process? pid liveness guarded against pid reuse by the start time.

A pid alone names a process only while it lives: once it is reaped the kernel may hand the same
number to an unrelated process, which a supervisor must never signal. The start time (field 22
of /proc/PID/stat, in clock ticks since boot) together with the pid names one process for the
life of the machine.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

__all__ = ["alive", "children", "cmdline", "descendants", "start_time", "stop", "users_of", "wait_gone"]

_POLL = 0.02


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    return text.rsplit(")", 1)[1].split()


def start_time(pid: int) -> int | None:
    """Start time of *pid*, or None if it is gone or a zombie (dead for every purpose of ours)."""
    rest = _stat_fields(pid)
    if rest is None or rest[0] in ("Z", "X"):
        return None
    return int(rest[19])


def alive(pid: int, started: int | None = None) -> bool:
    """True if *pid* runs (not a zombie) and, when *started* is given, is still that process."""
    now = start_time(pid)
    return now is not None and (started is None or now == started)


def _reap(pid: int) -> None:
    # Our own child stays a zombie until waited for; reaping it lets `alive` answer False.
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def wait_gone(pid: int, started: int | None, timeout: float) -> bool:
    """Wait up to *timeout* seconds for the process to end; True if it did."""
    deadline = time.monotonic() + timeout
    while True:
        _reap(pid)
        if not alive(pid, started):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL)


def stop(
    pid: int,
    started: int | None,
    grace: float = 10.0,
    patience: float = 5.0,
    on_signal: Callable[[int, signal.Signals], None] | None = None,
) -> bool:
    """End the process if it is still the same one: wait *grace*, then SIGTERM, then SIGKILL.

    Each signal gets *patience* seconds. Returns True once it is gone, False if even SIGKILL
    did not end it in time (a task
    stuck in the kernel, e.g. on a dead FUSE mount).
    """
    if wait_gone(pid, started, grace):
        return True
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not alive(pid, started):
            return True
        if on_signal is not None:
            on_signal(pid, sig)
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        if wait_gone(pid, started, patience):
            return True
    return False


def cmdline(pid: int) -> list[str]:
    """The process's argv (empty if it is gone or a kernel thread)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [os.fsdecode(a) for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _live_stats() -> list[tuple[int, list[str]]]:
    """(pid, stat fields after comm) of every process that is not a zombie."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        rest = _stat_fields(int(entry))
        if rest is not None and rest[0] not in ("Z", "X"):
            found.append((int(entry), rest))
    return found


def descendants(pid: int) -> dict[int, int]:
    """Live descendants of *pid* (children, grandchildren, ...) with their start times.

    By parentage, not by process group or session: fio's job processes call setsid(), so
    a group kill of fio misses them."""
    stats = _live_stats()
    kids: dict[int, list[tuple[int, int]]] = {}
    for child, rest in stats:
        kids.setdefault(int(rest[1]), []).append((child, int(rest[19])))
    found: dict[int, int] = {}
    todo = [pid]
    while todo:
        for child, started in kids.get(todo.pop(), []):
            if child not in found:
                found[child] = started
                todo.append(child)
    return found


def children(ppid: int) -> list[int]:
    """Live direct children of *ppid*."""
    return [pid for pid, rest in _live_stats() if int(rest[1]) == ppid]


def _inside(target: str, root: str) -> bool:
    return target == root or target.startswith(root.rstrip("/") + "/")


def users_of(path: str) -> dict[int, str]:
    """Processes whose working directory, root or an open descriptor lies at or below *path*.

    What makes an unmount fail with EBUSY, named (pid -> command name) so the error can say
    who. Links are read, never followed: reading them sends no request to a FUSE server.
    Memory maps are not scanned (a mapped file also has a descriptor in nearly every case).
    """
    root = os.path.realpath(path)
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        links = [f"/proc/{pid}/cwd", f"/proc/{pid}/root"]
        try:
            links += [f"/proc/{pid}/fd/{fd}" for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            pass  # gone, or not ours to read
        for link in links:
            try:
                target = os.readlink(link)
            except OSError:
                continue
            if _inside(target.removesuffix(" (deleted)"), root):
                try:
                    with open(f"/proc/{pid}/comm") as f:
                        found[pid] = f.read().strip()
                except OSError:
                    found[pid] = "?"
                break
    return found
