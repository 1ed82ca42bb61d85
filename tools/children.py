"""Stopping the servers that tools and tests start as children (platform, swtpm, sshd, proxies).

One owner for "SIGTERM by PID, SIGKILL if it lingers, always reap": every such server is our
own ``Popen`` child, so waiting on it both bounds the stop and leaves no zombie behind.
Key-holding daemons that are not our children are stopped through
`scratchfs.keyholder.procs.stop`, which also guards against pid reuse.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time

from scratchfs.keyholder import procs

__all__ = ["become_subreaper", "kill_tree", "stop_child"]

_PR_SET_CHILD_SUBREAPER = 36


def stop_child(proc: subprocess.Popen[bytes], sig: signal.Signals = signal.SIGTERM, patience: float = 10.0) -> None:
    """Send *sig* to a still-running child, SIGKILL it after *patience* seconds, and reap it."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=patience)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=patience)


def kill_tree(pid: int, proc: subprocess.Popen[str] | subprocess.Popen[bytes] | None = None,
              timeout: float = 10.0) -> list[int]:
    """SIGKILL *pid* and every descendant, and wait until none lives; returns survivors.

    For tools that fork workers (fio's jobs even start sessions of their own): killing the
    leader alone leaves the workers running with their files open, so the mount they work
    in stays busy. Descendants are found before the leader dies (after that they are
    reparented and no longer traceable to it); *proc*, if given, is reaped.
    """
    known: dict[int, int | None] = {pid: procs.start_time(pid)}
    deadline = time.monotonic() + timeout
    while True:
        if procs.alive(pid, known[pid]):
            known.update(procs.descendants(pid))
        for victim, started in known.items():
            if procs.alive(victim, started):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(victim, signal.SIGKILL)
        if proc is not None:
            proc.poll()
        left = [p for p, started in known.items() if procs.alive(p, started)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.02)


def become_subreaper() -> bool:
    """Make orphaned descendants our children instead of init's (PR_SET_CHILD_SUBREAPER),
    so a supervisor can still find and end workers whose parent died. True if it took."""
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
