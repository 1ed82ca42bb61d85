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
| open handles | charged to the memory budget (`HANDLE_COST` each, given back at release) | ENFILE |

How the accounting matches the daemon's real memory (issue 24: it used to undercount by 8-30 %):

- Python objects of a fixed shape (an inode, a directory entry's tuple, an open handle) are
  charged a constant each, measured as RSS growth of the daemon per object (see each constant).
- Variable-size objects (names, symlink targets, xattr names and values) are charged what
  CPython and its allocator really take for a `bytes` of that length (`bytes_cost`).
- Hash tables and lists (the inode table, each directory's two dicts and cookie list, each
  inode's xattr dict) are charged their real size (`sys.getsizeof`, O(1)) after every change,
  because their per-entry cost varies 2-4x with how full they are. Before an insertion that
  will make CPython resize a dict, the new table's size must fit (`dict_growth`): old and new
  table both exist while it is copied, and a 1M-entry table grows by 40 MiB in one step.

An owner's reserve (`owner_reserve_percent` of the budget and of the inodes, `--owner-reserve`;
ext4 reserves 5 % of its blocks for root the same way) can be spent only by requests of the
mount's owner or root: when an unprivileged user has spent the rest, ENOSPC stops that user,
and the owner can still create, write and open files. Which requests count as the owner's is
decided by the FUSE layer (`owner_request`).
"""

from __future__ import annotations

import errno
import logging
import sys
from collections.abc import Sized
from contextvars import ContextVar
from dataclasses import dataclass

from scratchfs.errors import FsError

log = logging.getLogger("scratchfs.limits")

# --- what one object costs (bytes) -----------------------------------------------------------------
# Calibrated on CPython 3.11 (x86_64, pymalloc): RSS growth per object over 90,000-350,000 objects
# of each kind, minus what is charged exactly (names, tables); then checked in the daemon
# (`python -m tools.bench.object_costs`: `nobody` fills a 24 MiB budget with one kind on an
# `--allow-other` mount; docs/threat-model.md, "Memory"). Charged/real there, per kind: empty
# file 1.02 (short name) and 1.01 (255 bytes), hard link 1.01 / 0.99, symlink 1.02 / 1.03,
# directory 1.03 / 1.03, directory holding one file 1.02, xattr 1.02 / 1.02, file truncated
# once (content engine) 1.01; open handle 160 charged for 161 real. tests/unit/test_limits.py
# holds every kind within 10 %.
INODE_COST = 416
# Inode object (16 slots: 160) and what it keeps as a new inode: the int objects a request
# hands us (ino, mode, uid, gid, the parent in name_hint, one time stamp: 6 x 32) and the
# name_hint tuple (64). Measured 403. Later distinct time stamps and a lookup count past 256
# add up to 3 x 32 (+15 %), so the charge sits on the new inode's side of the range.
DIR_OBJECT_COST = 96  # Directory object (5 slots and GC header: 88); its three containers are charged as sized
ENTRY_COST = 96  # one directory entry: the (ino, cookie) tuple (64) and the cookie int (32); name and tables apart
HANDLE_COST = 160
# one open handle: Handle object (3 slots), the fh int, its slot in the handle table (a dict
# whose per-entry cost moves between ~36 and ~72 bytes with its fill: 136-170 B measured with
# 90,000-349,000 handles open), and the FileInfo reply, freed at once.
ENGINE_COST = 896
# a regular file's content engine, made on its first read, write or truncate even if it stays
# empty: FileContent (19 slots with its empty array, dicts and list: ~610) and the file's
# readers-writer lock with its slot in the lock table (~300). Measured 894-897 in-process, 905 in the daemon.
CONTENT_COST = 2816
# a file with content (charged by content.py at its first write): the FileKey with its AES-GCM
# context (OpenSSL's cipher context and key schedule, outside Python's heap), the blob id and
# its pin, the version array's first allocation. Measured 2,736 B per file with one byte
# written in the daemon, 2,964 in-process (it was charged 1,024 before issue 24).
DENSE_VERSION_COST = 8  # one slot of the contiguous version array (array('Q'))
FAR_VERSION_COST = 104  # one block version in the sparse dict (entry + two ints)

DEFAULT_MAX_INODES = 1_000_000
DEFAULT_MAX_XATTRS = 128  # as kernfs's user xattrs; 128 names of <=255 bytes keep listxattr < 64 KiB
DEFAULT_MAX_XATTR_BYTES = 256 * 1024
DEFAULT_MEMORY_BUDGET = 512 * 1024 * 1024  # ~700,000 files with short names, or 5M far block versions
DEFAULT_OWNER_RESERVE_PERCENT = 5  # as mke2fs -m: 25.6 MiB and 50,000 inodes at the defaults
MAX_OWNER_RESERVE_PERCENT = 50
# The largest size the kernel can address (MAX_LFS_FILESIZE); the backing store usually holds less.
MAX_LFS_FILESIZE = (1 << 63) - 1

# Whether the request being served may spend the owner's reserve (the mount's owner or root).
# Set by the FUSE layer at the start of every request; trio gives each task (and each worker
# thread it starts) its own copy, so concurrent requests never see each other's value.
owner_request: ContextVar[bool] = ContextVar("owner_request", default=False)


@dataclass(frozen=True)
class Limits:
    """The bounds of one mount (CLI: --max-file-size, --max-inodes, --max-xattrs, ...)."""

    max_file_size: int = MAX_LFS_FILESIZE
    max_inodes: int = DEFAULT_MAX_INODES
    max_xattrs: int = DEFAULT_MAX_XATTRS
    max_xattr_bytes: int = DEFAULT_MAX_XATTR_BYTES
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    owner_reserve_percent: int = DEFAULT_OWNER_RESERVE_PERCENT

    @property
    def reserved_bytes(self) -> int:
        """Bytes of the budget only the owner's requests may spend."""
        return self.memory_budget * self.owner_reserve_percent // 100

    @property
    def reserved_inodes(self) -> int:
        """Inodes only the owner's requests may make."""
        return self.max_inodes * self.owner_reserve_percent // 100


# --- exact sizes of CPython objects ----------------------------------------------------------------
def bytes_cost(length: int) -> int:
    """What a `bytes` of *length* takes on the heap: its object (33 + length) in pymalloc's
    16-byte size classes, or from 512 bytes on in a malloc chunk (8-byte header, 16-aligned)."""
    size = sys.getsizeof(b"") + length
    if size > 512:
        size += 8
    return (size + 15) & ~15


# CPython 3.11+ dicts with keys that are not all str: a header, an index array of `slots`
# entries of 1/2/4/8 bytes, and 2/3 * slots entries of 24 bytes. Checked against sys.getsizeof
# at import (_check_dict_model); if another interpreter differs, dict_growth falls back to
# "the table may double at any insertion", which only refuses earlier.
_DICT_HEADER = sys.getsizeof({0: 0}) - 8 - 5 * 24
_DICT_ENTRY = 24


def _dict_bytes(slots: int) -> int:
    width = 1 if slots <= 0xFF else 2 if slots <= 0xFFFF else 4 if slots <= 0xFFFFFFFF else 8
    return _DICT_HEADER + slots * width + (2 * slots // 3) * _DICT_ENTRY


_SLOTS_BY_SIZE = {_dict_bytes(1 << k): 1 << k for k in range(3, 48)}


def _new_slots(used: int) -> int:
    """The table CPython builds when it resizes a dict holding *used* entries: GROWTH_RATE
    (3 x used) through calculate_log2_keysize, the smallest power of two >= (3 x used | 8)."""
    return 1 << ((3 * used | 8) - 1).bit_length()


def dict_growth(table: Sized, appended: int) -> int:
    """Bytes the next insertion of a new key into *table* may allocate: the whole new table if
    it is due for a resize (it and the old one both exist while entries are copied), else 0.

    *appended*: entries added since the table was last rebuilt (CPython's dk_nentries, which
    removals do not lower); keep it with `appended_after`.
    """
    size = sys.getsizeof(table)
    slots = _SLOTS_BY_SIZE.get(size) if DICT_MODEL_EXACT else None
    if slots is None:
        # The empty dict's shared table, or an interpreter whose layout we do not know.
        return _dict_bytes(8) if not table else 2 * size
    if appended < 2 * slots // 3:
        return 0
    return _dict_bytes(_new_slots(len(table)))


def appended_after(table: Sized, size_before: int, appended: int) -> int:
    """*appended* after one new key went into *table* (size_before: its getsizeof before)."""
    return len(table) if sys.getsizeof(table) != size_before else appended + 1


def list_growth(items: Sized) -> int:
    """Bytes the next append to *items* may allocate (CPython over-allocates by ~1/8; a
    realloc may copy, so the new array counts whole)."""
    return sys.getsizeof(items) + sys.getsizeof(items) // 8 + 64


def _check_dict_model() -> bool:
    """Whether dict_growth predicts this interpreter's dicts exactly (inserts and removals)."""
    table: dict[object, object] = {}
    appended = 0
    for i in range(3000):
        due = dict_growth(table, appended)
        before = sys.getsizeof(table)
        table[b"%d" % i] = None
        after = sys.getsizeof(table)
        if (after != before) != (due > 0) or (due and after != due):
            return False
        appended = appended_after(table, before, appended)
        # removals of every other entry in some stretches, to rebuild tables of any fill
        if (i >> 7) % 3 == 1 and i % 2:
            del table[b"%d" % (i - 1)]
    return True


DICT_MODEL_EXACT = True  # dict_growth reads it: assumed while it is being checked
DICT_MODEL_EXACT = _check_dict_model()


class MemoryBudget:
    """Bytes of metadata charged against a limit, of which `owner_reserve` only the owner may use.

    `reserve(n)` refuses (ENOSPC) before anything is allocated; `adjust(delta)` settles what an
    operation really cost (may go negative when memory is given back). Refusals of each kind are
    logged at the 1st, 2nd, 4th, 8th... one, so a flood cannot flood the log too.
    """

    __slots__ = ("limit", "owner_reserve", "refusals", "used")

    def __init__(self, limit: int, owner_reserve: int = 0) -> None:
        self.limit = limit
        self.owner_reserve = owner_reserve
        self.used = 0
        self.refusals: dict[str, int] = {}  # per kind of limit; a handful of keys

    def available_limit(self) -> int:
        """The limit for the request being served: all of it for the owner, less the reserve otherwise."""
        return self.limit if owner_request.get() else self.limit - self.owner_reserve

    def refuse(self, what: str, err: int = errno.ENOSPC) -> FsError:
        """Count and (sparsely) log a refusal; returns the error to raise."""
        n = self.refusals[what] = self.refusals.get(what, 0) + 1
        if n & (n - 1) == 0:
            log.warning(
                "event=limit_reached what=%s budget_used=%d budget=%d owner_reserve=%d refusals=%d",
                what,
                self.used,
                self.limit,
                self.owner_reserve,
                n,
            )
        return FsError(err, f"{what} limit reached")

    def reserve(self, nbytes: int, headroom: int = 0, err: int = errno.ENOSPC) -> None:
        """Charge *nbytes*, or raise *err* (charging nothing) if they, plus *headroom* bytes that
        the operation may allocate transiently or settle later (a table's resize), do not fit."""
        if self.used + nbytes + headroom > self.available_limit():
            raise self.refuse("memory_budget", err)
        self.used += nbytes

    def check(self, nbytes: int) -> None:
        """Raise ENOSPC if *nbytes* more would exceed the budget (charges nothing)."""
        if self.used + nbytes > self.available_limit():
            raise self.refuse("memory_budget")

    def adjust(self, delta: int) -> None:
        """Settle a change already made (a release, or the real cost after `check`)."""
        self.used += delta
