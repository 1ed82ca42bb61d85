"""Limits on what users of the mount can make the daemon allocate, and the memory budget. Pure.

Any user of an `--allow-other` mount (the unprivileged scan engine) is untrusted: every structure
it can grow is bounded here, with the errno tmpfs users know, so that nobody can make the daemon
(and with it every key, hence all data on the mount) die of memory exhaustion:

| what | bound | errno |
|---|---|---|
| file size | `max_file_size` (default: 2^63 - 1, the kernel's own limit) | EFBIG |
| inodes | `max_inodes` | ENOSPC (statfs f_files/f_ffree report it) |
| xattrs per inode | `max_xattrs` names, `max_xattr_bytes` names+values | ENOSPC (a value > 64 KiB: E2BIG) |
| metadata memory | `memory_budget` bytes, accounted below | ENOSPC + one WARNING line per doubling |

The accounting charges what each structure costs in CPython (measured with tracemalloc on
CPython 3.11: an empty file with its directory entry ~540 bytes, a far block version ~100 bytes),
rounded up, so the budget tracks the daemon's real heap within a small factor.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass

from scratchfs.errors import FsError

log = logging.getLogger("scratchfs.limits")

# Per-structure costs charged to the budget (bytes; see the module docstring).
INODE_COST = 512  # Inode object with its slots, its entry in the inode table
ENTRY_COST = 96  # one directory entry (dicts + cookie list) plus the name's own bytes
XATTR_COST = 160  # one xattr's dict slot and objects, plus name and value bytes
DENSE_VERSION_COST = 8  # one slot of the contiguous version array (array('Q'))
FAR_VERSION_COST = 104  # one block version in the sparse dict (entry + two ints)
CONTENT_COST = 1024  # a file with content: FileContent, FileKey, AES-GCM context, blob pin

DEFAULT_MAX_INODES = 1_000_000
DEFAULT_MAX_XATTRS = 128  # as kernfs's user xattrs; 128 names of <=255 bytes keep listxattr < 64 KiB
DEFAULT_MAX_XATTR_BYTES = 256 * 1024
DEFAULT_MEMORY_BUDGET = 512 * 1024 * 1024  # ~1M inodes with their names, or 5M far block versions
# The largest size the kernel can address (MAX_LFS_FILESIZE); the backing store usually holds less.
MAX_LFS_FILESIZE = (1 << 63) - 1


@dataclass(frozen=True)
class Limits:
    """The bounds of one mount (CLI: --max-file-size, --max-inodes, --max-xattrs, ...)."""

    max_file_size: int = MAX_LFS_FILESIZE
    max_inodes: int = DEFAULT_MAX_INODES
    max_xattrs: int = DEFAULT_MAX_XATTRS
    max_xattr_bytes: int = DEFAULT_MAX_XATTR_BYTES
    memory_budget: int = DEFAULT_MEMORY_BUDGET


class MemoryBudget:
    """Bytes of metadata charged against a limit.

    `reserve(n)` refuses (ENOSPC) before anything is allocated; `adjust(delta)` settles what an
    operation really cost (may go negative when memory is given back). Refusals of each kind are
    logged at the 1st, 2nd, 4th, 8th... one, so a flood cannot flood the log too.
    """

    __slots__ = ("limit", "refusals", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.refusals: dict[str, int] = {}  # per kind of limit; a handful of keys

    def refuse(self, what: str, err: int = errno.ENOSPC) -> FsError:
        """Count and (sparsely) log a refusal; returns the error to raise."""
        n = self.refusals[what] = self.refusals.get(what, 0) + 1
        if n & (n - 1) == 0:
            log.warning(
                "event=limit_reached what=%s budget_used=%d budget=%d refusals=%d", what, self.used, self.limit, n
            )
        return FsError(err, f"{what} limit reached")

    def reserve(self, nbytes: int) -> None:
        """Charge *nbytes*, or raise ENOSPC (charging nothing) if the budget would be exceeded."""
        if self.used + nbytes > self.limit:
            raise self.refuse("memory_budget")
        self.used += nbytes

    def check(self, nbytes: int) -> None:
        """Raise ENOSPC if *nbytes* more would exceed the budget (charges nothing)."""
        if self.used + nbytes > self.limit:
            raise self.refuse("memory_budget")

    def adjust(self, delta: int) -> None:
        """Settle a change already made (a release, or the real cost after `check`)."""
        self.used += delta

