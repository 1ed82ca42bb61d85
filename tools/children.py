"""Stopping the servers that tools and tests start as children (platform, swtpm, sshd, proxies).

One owner for "SIGTERM by PID, SIGKILL if it lingers, always reap": every such server is our
own ``Popen`` child, so waiting on it both bounds the stop and leaves no zombie behind.
Key-holding daemons that are not our children are stopped through
`scratchfs.keyholder.procs.stop`, which also guards against pid reuse.
"""

from __future__ import annotations

import signal
import subprocess

__all__ = ["stop_child"]


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
