"""fallocate(2) on a file's content: which modes we serve, what we check, how a range is zeroed.

A companion of content.py (it uses FileContent's block plumbing: read one block, seal, write
runs, check the version map's growth), kept apart so that the content engine stays one screenful
of concerns; the FUSE handler in fuse_ops.py only translates.

Served modes, with the semantics of ext4 and tmpfs:

- 0 (allocate): the size grows to offset + length if that is larger; the new range reads zeros.
- FALLOC_FL_KEEP_SIZE: the same checks, the size stays.
- FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE: whole blocks in the range become holes (their
  records are punched out of the blob, or zeroed where the backing filesystem cannot punch;
  overflow slots are freed, as truncate frees them); partial blocks at the edges are zeroed
  by read-modify-write, re-sealed under a new version like any write. The size stays.
- FALLOC_FL_ZERO_RANGE [| FALLOC_FL_KEEP_SIZE]: zeros like a punch, with the allocation checks,
  and without KEEP_SIZE the size grows to offset + length.

Any other bit is EOPNOTSUPP (the kernel already refuses most of them itself); a negative offset
or a non-positive length is EINVAL; a range ending past `--max-file-size` is EFBIG for every
mode (the limit plays the part of the kernel's s_maxbytes, which vfs_fallocate checks the same
way), before anything changes.

What "allocated" means here. Ciphertext cannot be written before the plaintext exists (each
record is sealed under the write's version), so an allocated range is a hole in the block map,
as on tmpfs before the first write. What a caller relies on fallocate for is that later writes
into the range do not fail for lack of space; we check, at the time of the call, what can be
checked and refuse with the errno a full filesystem gives:

- EFBIG if the range passes `--max-file-size`;
- ENOSPC if the backing filesystem's available space (statvfs f_bavail of the blob store) is
  smaller than the records the range's not-yet-written blocks will need;
- ENOSPC if the memory budget cannot hold the block versions of the whole range.

Nothing is reserved: space that other files (or other users of the backing filesystem) take
after the call can still make a later write fail with ENOSPC, as it can on any filesystem that
overcommits (tmpfs, btrfs with compression, thin provisioning).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Callable

from scratchfs import blocks
from scratchfs.content import FileContent
from scratchfs.errors import FsError
from scratchfs.limits import MAX_LFS_FILESIZE

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
SERVED_MODES = frozenset(
    {0, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE,
     FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE}
)  # fmt: skip


def _libc_fallocate() -> Callable[[int, int, int, int], int]:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fn = libc.fallocate
    fn.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    fn.restype = ctypes.c_int
    return fn


_fallocate = _libc_fallocate()


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """The fallocate(2) system call (Python's os module has only posix_fallocate)."""
    if _fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def check_request(mode: int, offset: int, length: int, max_file_size: int) -> None:
    """Refuse a request we do not serve, before anything changes (FsError)."""
    if mode not in SERVED_MODES:
        raise FsError(errno.EOPNOTSUPP)
    if offset < 0 or length <= 0:
        raise FsError(errno.EINVAL)
    if offset + length > min(max_file_size, MAX_LFS_FILESIZE):
        raise FsError(errno.EFBIG)


def hole_blocks(content: FileContent, first: int, last: int) -> int:
    """How many of blocks first..last are holes (not yet backed by a record)."""
    versions = content.versions
    dense_end = min(last + 1, len(versions))
    written = sum(1 for i in range(first, dense_end) if versions[i]) if first < dense_end else 0
    if content.far:
        written += sum(1 for i in content.far if first <= i <= last)
    return (last - first + 1) - written


def check_space(content: FileContent, mode: int, offset: int, end: int) -> None:
    """ENOSPC unless the backing store and the memory budget can take writes to [offset, end)
    (allocating modes; a punch needs no space). Checked, not reserved (module docstring).

    Runs on the trio thread: it may drain the removal queue (reaper.py), which lives there."""
    if mode & FALLOC_FL_PUNCH_HOLE:
        return
    bs = content.block_size
    first, last = offset // bs, (end - 1) // bs
    needed = hole_blocks(content, first, last) * (bs + blocks.OVERHEAD)
    if needed:
        st = content.store.statvfs()
        if needed > st.f_bavail * st.f_frsize:
            # Blobs of deleted files may still wait in the removal queue: their space counts.
            if not content.store.free_queued():
                raise FsError(errno.ENOSPC)
            st = content.store.statvfs()
            if needed > st.f_bavail * st.f_frsize:
                raise FsError(errno.ENOSPC)
    content._check_growth(first, last)


def zero_range(content: FileContent, offset: int, end: int) -> None:
    """Make [offset, end) read zeros, size unchanged: whole blocks become holes, the partial
    blocks at the edges are re-sealed with zeros in the range. Past the end of file: nothing."""
    end = min(end, content.size)
    if offset >= end or content.blob_id is None:
        return
    bs = content.block_size
    size = content.size
    fd = content._main_fd()
    first, last = offset // bs, (end - 1) // bs
    whole_first, whole_last = first, last
    edges: list[tuple[int, bytes | bytearray, list[int]]] = []
    for index in sorted({first, last}):
        bstart = index * bs
        plain_len = blocks.block_length(index, size, bs)
        if offset <= bstart and end >= bstart + plain_len:
            continue  # wholly inside the range
        if index == first:
            whole_first = first + 1
        if index == last:
            whole_last = last - 1
        if not content._version(index):
            continue  # a hole already reads zeros
        plain = content._read_blocks(index, index)
        lo, hi = max(offset, bstart) - bstart, min(end, bstart + plain_len) - bstart
        plain[lo:hi] = bytes(hi - lo)
        edges.append(content._seal_one(index, plain))
    if edges:
        content._write_runs(fd, edges)
    if whole_first <= whole_last:
        content.make_holes(fd, whole_first, whole_last, _punch_backing)


def _punch_backing(fd: int, offset: int, length: int) -> None:
    """Make [offset, offset + length) of a blob read zeros, freeing its space where the backing
    filesystem can punch holes (ext4, xfs, btrfs, tmpfs), else by writing zeros."""
    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        return
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise
    chunk = bytes(min(length, 1 << 20))
    pos, stop = offset, offset + length
    while pos < stop:
        n = min(len(chunk), stop - pos)
        if os.pwrite(fd, chunk[:n], pos) != n:
            raise OSError(errno.ENOSPC, "short write to the backing store")
        pos += n


def apply(content: FileContent, mode: int, offset: int, length: int) -> None:
    """Serve one fallocate request on *content*: the caller holds its write lock and has run
    check_request and check_space, so every check ran before this first change."""
    end = offset + length
    if not mode & FALLOC_FL_KEEP_SIZE and end > content.size:
        content.truncate(end)
    if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
        zero_range(content, offset, end)
