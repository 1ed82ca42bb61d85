"""Crash points for the tests of crash-safe sequences (a power cut cannot be timed for real).

``SCANNER_AGENT_CRASH_AT=NAME`` in the environment makes the agent SIGKILL itself when it
reaches `crash_point(NAME)`: exactly what a power cut at that step leaves on disk and on the
platform, without a mock anywhere. The variable names a step, never a secret; unset (as in
production), a crash point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV: str = "SCANNER_AGENT_CRASH_AT"


def crash_point(name: str) -> None:
    """SIGKILL this process if the environment asks for a crash at *name*."""
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
