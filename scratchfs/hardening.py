"""Process hardening for key holders: no core dumps, not ptrace-able, memory kept out of swap."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import resource

log = logging.getLogger("scratchfs.hardening")

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3
MCL_CURRENT = 1
MCL_FUTURE = 2
MCL_ONFAULT = 4  # Linux 4.4+: lock pages as they are touched instead of faulting everything in


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def harden_process(lock_memory: bool = True) -> dict[str, bool]:
    """Apply every protection the platform allows; returns which ones took effect.

    Failures are logged once at WARNING (e.g. mlockall without CAP_IPC_LOCK and a small
    RLIMIT_MEMLOCK) and are not fatal: the keys still never reach disk through our own code.
    """
    libc = _libc()
    result = {"core_limit": False, "non_dumpable": False, "memory_locked": False}
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        result["core_limit"] = True
    except (ValueError, OSError) as e:
        log.warning("event=harden_failed step=rlimit_core error=%s", e)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0:
        result["non_dumpable"] = True
    else:
        log.warning("event=harden_failed step=prctl_dumpable errno=%d", ctypes.get_errno())
    if lock_memory:
        # MCL_ONFAULT keeps the lock's promise (no locked page is ever swapped) without
        # pre-faulting every mapping: plain MCL_CURRENT|MCL_FUTURE doubled the idle RSS and made
        # every large malloc pay for zeroing all its pages up front.
        if libc.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) == 0 or libc.mlockall(MCL_CURRENT | MCL_FUTURE) == 0:
            result["memory_locked"] = True
        else:
            log.warning(
                "event=harden_failed step=mlockall errno=%d note=keys_may_reach_swap_if_swap_is_enabled",
                ctypes.get_errno(),
            )
    return result


def is_dumpable() -> bool:
    """Current PR_GET_DUMPABLE value as a bool (for tests and diagnostics)."""
    return bool(_libc().prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))
