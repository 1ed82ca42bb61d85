"""Thin wrappers over system tools: run a command, unmount, stop a process.

Mount lookup and pid liveness belong to `scratchfs.keyholder` (mountinfo, procs).

Every failure becomes a ToolError with a one-line message (the tool's last stderr line);
secrets are only ever passed on a command's standard input, never in its arguments.
"""

from __future__ import annotations

import logging
import signal
import subprocess
from pathlib import Path

from scratchfs.keyholder import procs
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


def umount(path: Path, *, what: str, lazy: bool = False) -> None:
    """Unmount *path* (lazily if asked)."""
    argv = ["umount", *(["-l"] if lazy else []), str(path)]
    run(argv, what=what)


def stop_process(pid: int, start_time: int, grace: float = 10.0) -> None:
    """End the process *pid* (if still the same one): wait, then SIGTERM, then SIGKILL."""

    def tell(pid: int, sig: signal.Signals) -> None:
        log.warning("event=stop_process pid=%d signal=%s", pid, sig.name)

    if not procs.stop(pid, start_time, grace, on_signal=tell):
        raise ToolError(f"process {pid} did not stop; kill it by hand")
