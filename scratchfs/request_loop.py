"""How long the FUSE request loop polls for the next request before it sleeps.

The patched pyfuse3 (third_party/pyfuse3/direct-read.patch) reads /dev/fuse non-blocking and,
when no request is queued, keeps trying for up to ``spin_ns`` before it waits through trio.
A wait through trio (lock hand-off, epoll_ctl, epoll_wait, task reschedule) costs the daemon
~25 µs of CPU per request on the machines we measured and puts the wake-up on the caller's
critical path; a synchronous caller's next request usually arrives sooner than that. Spinning
for about what sleeping costs bounds the CPU it can waste to that of the sleep it replaces
(the classic two-phase wait), and is only worth it where the caller can run on another CPU
while we spin: with one CPU the spin delays the very request it waits for.

Measured (`python -m tools.bench --targets zerofs,gocryptfs,scratchfs-agent --workloads fio,tree`,
docs/bench.md): 4 KiB random reads at QD1 1.8x, tar extract 2x faster on the agent's mount.
"""

from __future__ import annotations

import inspect
import os

import pyfuse3

__all__ = ["DEFAULT_SPIN_US", "MAX_SPIN_US", "default_spin_us", "main_kwargs", "spin_ns"]

DEFAULT_SPIN_US = 30
MAX_SPIN_US = 1000  # beyond a millisecond a spin is a busy loop, not a wait


def default_spin_us() -> int:
    """DEFAULT_SPIN_US where this process may run on more than one CPU, else 0 (no spin)."""
    return DEFAULT_SPIN_US if len(os.sched_getaffinity(0)) > 1 else 0


def spin_ns(spin_us: int | None) -> int:
    """The nanoseconds to hand pyfuse3.main(spin_ns=...): *spin_us*, or the default if None."""
    us = default_spin_us() if spin_us is None else spin_us
    if not 0 <= us <= MAX_SPIN_US:
        raise ValueError(f"spin must be 0..{MAX_SPIN_US} µs")
    return us * 1000


def main_kwargs(spin_us: int | None) -> dict[str, int]:
    """Keyword arguments for pyfuse3.main: ``spin_ns`` where the installed pyfuse3 takes it (make
    setup's build); none on a stock pyfuse3, which always waits through trio."""
    if "spin_ns" not in inspect.signature(pyfuse3.main).parameters:
        return {}
    return {"spin_ns": spin_ns(spin_us)}
