"""A file's encrypted content: block versions in memory, records in its blob.

`FileContent` methods are synchronous and do the crypto and the blob I/O; the FUSE layer calls
them inline for small requests and on a worker thread for large ones, always holding the
inode's lock (reads shared, writes exclusive), so a reader never sees half a write.

What memory knows and the blob must agree with: the plaintext size, each block's version (0 for
a hole), and the blob's length. Any disagreement is an IntegrityError, never data.
"""

from __future__ import annotations

import os
from array import array

from scratchfs import blocks
from scratchfs.crypto import FileKey
from scratchfs.errors import IntegrityError
from scratchfs.store import BlobStore


class FileContent:
    """The content of one regular file."""

    __slots__ = (
        "allocated",
        "blob_id",
        "blob_len",
        "block_size",
        "fd",
        "key",
        "next_version",
        "size",
        "store",
        "versions",
    )

    def __init__(self, store: BlobStore, block_size: int) -> None:
        self.store = store
        self.block_size = block_size
        self.size = 0
        self.versions = array("Q")
        self.next_version = 1
        self.blob_id: bytes | None = None
        self.key: FileKey | None = None
        self.fd = -1
        self.blob_len = 0
        self.allocated = 0  # blocks that are not holes

    def __repr__(self) -> str:
        return f"<FileContent size={self.size} blocks={len(self.versions)}>"

    # --- blob and fd management ------------------------------------------------------------
    def ensure_blob(self) -> int:
        """Create the blob and key on first write, or reopen the blob's fd; returns the fd."""
        if self.blob_id is None:
            self.blob_id, self.fd = self.store.new_blob()
            self.key = FileKey.new()
        elif self.fd < 0:
            self.fd = self.store.open_blob(self.blob_id)
        return self.fd

    def ready(self) -> None:
        """Make sure the blob's fd is open if the file has a blob (call on the trio thread)."""
        if self.blob_id is not None and self.fd < 0:
            self.fd = self.store.open_blob(self.blob_id)

    def close_fd(self) -> None:
        """Close the blob's fd (reopened on next use); keeps key and data."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def destroy(self) -> None:
        """Crypto-shred: drop the key, then remove the blob."""
        self.close_fd()
        if self.key is not None:
            self.key.destroy()
            self.key = None
        if self.blob_id is not None:
            self.store.remove_blob(self.blob_id)
            self.blob_id = None
        self.versions = array("Q")
        self.size = 0
        self.allocated = 0

    def sync(self, datasync: bool) -> None:
        """fsync/fdatasync the blob (durable for the life of the mount, nothing more)."""
        if self.blob_id is None:
            return
        fd = self.ensure_blob()
        if datasync:
            os.fdatasync(fd)
        else:
            os.fsync(fd)

    @property
    def st_blocks(self) -> int:
        """Allocated 512-byte units, as stat reports them."""
        allocated_bytes = min(self.size, self.allocated * self.block_size)
        return (allocated_bytes + 511) // 512

    # --- helpers -----------------------------------------------------------------------------
    def _version(self, index: int) -> int:
        return self.versions[index] if index < len(self.versions) else 0

    def _set_version(self, index: int, version: int) -> None:
        versions = self.versions
        if index >= len(versions):
            versions.extend(array("Q", bytes(8 * (index + 1 - len(versions)))))
        old = versions[index]
        if old == 0 and version != 0:
            self.allocated += 1
        elif old != 0 and version == 0:
            self.allocated -= 1
        versions[index] = version

    def _take_version(self) -> int:
        version = self.next_version
        self.next_version += 1
        return version

    def _check_blob_len(self, fd: int) -> None:
        actual = os.fstat(fd).st_size
        if actual != self.blob_len:
            raise IntegrityError(f"blob is {actual} bytes, expected {self.blob_len} (truncated or extended)")

    def _decode(self, first: int, last: int, raw: bytes, raw_base: int, size: int) -> list[bytes]:
        """Decrypt blocks first..last from *raw* (blob bytes starting at offset *raw_base*)."""
        bs = self.block_size
        out: list[bytes] = []
        view = memoryview(raw)
        key = self.key
        blob_id = self.blob_id
        for index in range(first, last + 1):
            plain_len = blocks.block_length(index, size, bs)
            start = blocks.record_offset(index, bs) - raw_base
            record = view[start : start + plain_len + blocks.OVERHEAD]
            version = self._version(index)
            if version == 0:
                if not blocks.is_zero(record):
                    raise IntegrityError("data found where a hole must be", index)
                out.append(bytes(plain_len))
            else:
                assert key is not None and blob_id is not None
                out.append(blocks.open_block(key, blob_id, index, version, record, plain_len))
        return out

    def _read_blocks(self, first: int, last: int) -> list[bytes]:
        """Authenticated plaintext of blocks first..last (each full logical length)."""
        if self.blob_id is None:
            return [bytes(blocks.block_length(i, self.size, self.block_size)) for i in range(first, last + 1)]
        fd = self.ensure_blob()
        self._check_blob_len(fd)
        bs = self.block_size
        base = blocks.record_offset(first, bs)
        end = blocks.record_offset(last, bs) + blocks.block_length(last, self.size, bs) + blocks.OVERHEAD
        raw = os.pread(fd, end - base, base) if base < self.blob_len else b""
        if len(raw) < end - base:
            # Past the blob's end only holes may lie; pad so the hole check sees zeros there.
            for index in range(first, last + 1):
                rec_end = blocks.record_offset(index, bs) + blocks.block_length(index, self.size, bs) + blocks.OVERHEAD
                if self._version(index) and rec_end > base + len(raw):
                    raise IntegrityError("record missing (blob truncated)", index)
            raw = raw + bytes(end - base - len(raw))
        return self._decode(first, last, raw, base, self.size)

    # --- the three content operations ------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        """Up to *length* plaintext bytes at *offset* (short at end of file)."""
        if offset >= self.size or length <= 0:
            return b""
        length = min(length, self.size - offset)
        bs = self.block_size
        span = blocks.block_span(offset, length, bs)
        plains = self._read_blocks(span.start, span.stop - 1)
        joined = plains[0] if len(plains) == 1 else b"".join(plains)
        start = offset - span.start * bs
        return joined[start : start + length]

    def write(self, offset: int, data: bytes | memoryview) -> int:
        """Write *data* at *offset*, growing the file if needed; returns len(data)."""
        length = len(data)
        if length == 0:
            return 0
        bs = self.block_size
        end = offset + length
        old_size = self.size
        new_size = max(old_size, end)
        fd = self.ensure_blob()
        records: list[tuple[int, int, tuple[bytes, bytes]]] = []
        # Growing past a short last block: it must be re-sealed at its new, longer length.
        old_last = (old_size - 1) // bs if old_size else -1
        if old_size % bs and old_last < offset // bs:
            records.append(self._reseal_grown(old_last, old_size, new_size))
        span = blocks.block_span(offset, length, bs)
        view = memoryview(data)
        partial = [i for i in (span.start, span.stop - 1) if self._is_partial(i, offset, end, new_size)]
        old_plain: dict[int, bytes] = {}
        for index in sorted(set(partial)):
            if index * bs < old_size:
                old_plain[index] = self._read_blocks(index, index)[0]
        assert self.key is not None and self.blob_id is not None
        key, blob_id = self.key, self.blob_id
        for index in span:
            bstart = index * bs
            plain_len = blocks.block_length(index, new_size, bs)
            lo = max(offset, bstart)
            hi = min(end, bstart + bs)
            chunk = view[lo - offset : hi - offset]
            if index in partial:
                old = old_plain.get(index, b"")
                old = old[:plain_len] + bytes(max(0, plain_len - len(old)))
                plain: bytes | memoryview = old[: lo - bstart] + bytes(chunk) + old[hi - bstart :]
            else:
                plain = chunk
            version = self._take_version()
            records.append((index, version, blocks.seal_block(key, blob_id, index, version, plain)))
        self._write_records(fd, records)
        self.size = new_size
        return length

    def truncate(self, new_size: int) -> None:
        """Set the size; blocks past it are dropped, a new short last block is re-sealed."""
        old_size = self.size
        if new_size == old_size:
            return
        bs = self.block_size
        if self.blob_id is None:
            self.size = new_size
            return
        fd = self.ensure_blob()
        if new_size > old_size:
            if old_size % bs:
                record = self._reseal_grown((old_size - 1) // bs, old_size, new_size)
                self._write_records(fd, [record])
            self.size = new_size
            return
        keep = blocks.block_count(new_size, bs)
        tail = new_size % bs
        records: list[tuple[int, int, tuple[bytes, bytes]]] = []
        if tail and self._version(keep - 1):
            plain = self._read_blocks(keep - 1, keep - 1)[0][:tail]
            assert self.key is not None and self.blob_id is not None
            version = self._take_version()
            records.append((keep - 1, version, blocks.seal_block(self.key, self.blob_id, keep - 1, version, plain)))
            # The shortened record goes in before the blob is cut, so a failure leaves the old state.
            self._write_records(fd, records)
        for index in range(keep, len(self.versions)):
            self._set_version(index, 0)
        del self.versions[keep:]
        if tail:
            cut = blocks.record_offset(keep - 1, bs) + tail + blocks.OVERHEAD
        else:
            cut = blocks.record_offset(keep, bs)
        new_blob_len = min(self.blob_len, cut)
        os.ftruncate(fd, new_blob_len)
        self.blob_len = new_blob_len
        self.size = new_size

    # --- write plumbing ----------------------------------------------------------------------
    def _is_partial(self, index: int, offset: int, end: int, new_size: int) -> bool:
        bstart = index * self.block_size
        plain_len = blocks.block_length(index, new_size, self.block_size)
        return not (offset <= bstart and end >= bstart + plain_len)

    def _reseal_grown(self, index: int, old_size: int, new_size: int) -> tuple[int, int, tuple[bytes, bytes]]:
        """Re-seal the old short last block *index*, zero-extended to its length at *new_size*."""
        new_len = blocks.block_length(index, new_size, self.block_size)
        if self._version(index):
            old = self._read_blocks(index, index)[0]
        else:
            old = b""
        plain = old + bytes(new_len - len(old))
        assert self.key is not None and self.blob_id is not None
        version = self._take_version()
        record = blocks.seal_block(self.key, self.blob_id, index, version, plain)
        return index, version, record

    def _write_records(self, fd: int, records: list[tuple[int, int, tuple[bytes, bytes]]]) -> None:
        """Write records, coalescing consecutive blocks; versions change only once a run landed.

        If the backing store fails (ENOSPC, EIO), blocks that were not rewritten keep their old
        version and stay readable; a blob extended by a failed write is cut back.
        """
        if not records:
            return
        bs = self.block_size
        records.sort(key=lambda r: r[0])
        runs: list[list[tuple[int, int, tuple[bytes, bytes]]]] = [[records[0]]]
        for rec in records[1:]:
            if rec[0] == runs[-1][-1][0] + 1:
                runs[-1].append(rec)
            else:
                runs.append([rec])
        for run in runs:
            offset = blocks.record_offset(run[0][0], bs)
            buffers = [part for r in run for part in r[2]]
            total = sum(len(b) for b in buffers)
            try:
                written = os.pwritev(fd, buffers, offset)
                if written != total:
                    raise OSError(28, "short write to the backing store")
            except OSError:
                if os.fstat(fd).st_size > self.blob_len:
                    os.ftruncate(fd, self.blob_len)
                raise
            for index, version, _ in run:
                self._set_version(index, version)
            self.blob_len = max(self.blob_len, offset + total)
