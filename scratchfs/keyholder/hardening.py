"""Process hardening for key holders: no core dumps, not ptrace-able, memory kept out of swap.

Every key-holding process (scratchfs daemon, userspace volume server, agent) calls
`harden_process()` first thing, before any key is in its memory.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import resource
import signal
from dataclasses import dataclass

__all__ = ["Hardening", "die_with_parent", "harden_process", "is_dumpable"]

log = logging.getLogger("scratchfs.keyholder.hardening")

_PR_SET_PDEATHSIG = 1
_PR_GET_DUMPABLE = 3
_PR_SET_DUMPABLE = 4
_MCL_CURRENT = 1
_MCL_FUTURE = 2
_MCL_ONFAULT = 4  # Linux 4.4+: lock pages as they are touched instead of faulting everything in


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Hardening:
    """Which protections took effect (each failure was logged once at WARNING)."""

    core_limit: bool
    non_dumpable: bool
    memory_locked: bool


def _no_core() -> bool:
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError) as e:
        log.warning("event=harden_failed step=rlimit_core error=%s", type(e).__name__)
        return False
    return True


def is_dumpable() -> bool:
    """PR_GET_DUMPABLE of this process: False once ptrace by other users and core dumps are off."""
    return bool(_libc().prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0))


def _non_dumpable() -> bool:
    libc = _libc()
    rc = libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    err = ctypes.get_errno()
    # Checked, not assumed: a seccomp filter or LSM may turn prctl into a silent no-op.
    if rc != 0 or is_dumpable():
        log.warning("event=harden_failed step=prctl_dumpable errno=%d", err)
        return False
    return True


def _lock_memory() -> bool:
    libc = _libc()
    # MCL_ONFAULT keeps the lock's promise (no locked page is ever swapped) without
    # pre-faulting every mapping: plain MCL_CURRENT|MCL_FUTURE doubled the idle RSS and made
    # every large malloc pay for zeroing all its pages up front. Older kernels (EINVAL) get
    # the plain form.
    if libc.mlockall(_MCL_CURRENT | _MCL_FUTURE | _MCL_ONFAULT) == 0:
        return True
    if libc.mlockall(_MCL_CURRENT | _MCL_FUTURE) == 0:
        return True
    log.warning(
        "event=harden_failed step=mlockall errno=%d note=keys_may_reach_swap_if_swap_is_enabled",
        ctypes.get_errno(),
    )
    return False


def harden_process(lock_memory: bool = True) -> Hardening:
    """Apply every protection the platform allows; returns which ones took effect.

    Failures are logged once at WARNING (e.g. mlockall without CAP_IPC_LOCK and a small
    RLIMIT_MEMLOCK) and are not fatal: the keys still never reach disk through our own code.
    """
    return Hardening(
        core_limit=_no_core(),
        non_dumpable=_non_dumpable(),
        memory_locked=_lock_memory() if lock_memory else False,
    )


def die_with_parent(sig: signal.Signals, parent_pid: int) -> bool:
    """Have the kernel send *sig* to this process when its parent *parent_pid* dies.

    Returns False if that cannot be promised: prctl failed, or the parent already died before
    prctl took effect (we were reparented), so the caller should exit rather than hold a key
    nobody supervises. The death signal survives execve; it fires when the parent *thread* that
    forked us exits, so parents fork from a long-lived thread.
    """
    if _libc().prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        log.warning("event=harden_failed step=prctl_pdeathsig errno=%d", ctypes.get_errno())
        return False
    return os.getppid() == parent_pid
