"""A file's encrypted content: block versions in memory, records in its blob.

`FileContent` methods are synchronous and do the crypto and the blob I/O; the FUSE layer calls
them inline for small requests and on a worker thread for large ones, always holding the
inode's lock (reads shared, writes exclusive), so a reader never sees half a write.

What memory knows and the blob must agree with: the plaintext size, each block's version (0 for
a hole), and the blob's length. Any disagreement is an IntegrityError, never data.

Memory is proportional to what is stored, never to offsets: block versions live in a dense
array for the contiguous prefix (8 bytes per block, the hot path) and in a dict for blocks far
beyond it, so a 1-byte write at 2^62 costs one dict entry, not an array of 2^48 slots. Both are
charged to the mount's memory budget (limits.py) before they grow.

Any offset the kernel allows (up to 2^63 - 1) can be stored, whatever the backing filesystem's
own limit (ext4: 16 TiB): a block whose record would lie past the largest blob the backing
store holds goes to the file's *overflow blob*, in a slot assigned at write (copy-on-write: a
rewrite takes a fresh slot, the old one is freed once the new record landed). The slot map lives
in memory; the associated data still binds blob id, block index and version, so a record moved
between slots, or from the main blob, fails. The kernel's own limit (s_maxbytes, which FUSE
fixes at 2^63 - 1) is then ours, so even with the writeback cache an oversized write fails at
write(2), before the page cache takes it.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import os
from array import array
from collections.abc import Callable, Iterator

from scratchfs import blocks
from scratchfs.crypto import FileKey
from scratchfs.errors import IntegrityError
from scratchfs.limits import CONTENT_COST, DENSE_VERSION_COST, FAR_VERSION_COST, MemoryBudget
from scratchfs.store import BlobStore, file_size

# A block at most this many slots past the dense array's end extends the array (so a file
# written with small gaps stays on the fast path); anything farther goes to the dict. The
# array's memory is then at most DENSE_SLACK * 8 bytes per stored block.
DENSE_SLACK = 64


class FileContent:
    """The content of one regular file."""

    __slots__ = (
        "allocated",
        "blob_id",
        "blob_len",
        "block_size",
        "budget",
        "charged",
        "far",
        "fd",
        "free_slots",
        "ident_blocks",
        "key",
        "next_slot",
        "next_version",
        "ovf_fd",
        "ovf_id",
        "size",
        "slots",
        "store",
        "versions",
    )

    def __init__(self, store: BlobStore, block_size: int, budget: MemoryBudget | None = None) -> None:
        self.store = store
        self.block_size = block_size
        self.budget = budget if budget is not None else MemoryBudget(1 << 62)
        self.charged = 0  # bytes of version map charged to the budget
        self.size = 0
        # Block versions: dense prefix, and far blocks (never a 0 value: absent means hole).
        self.versions = array("Q")
        self.far: dict[int, int] = {}
        self.next_version = 1
        self.blob_id: bytes | None = None
        self.key: FileKey | None = None
        self.fd = -1
        self.blob_len = 0
        self.allocated = 0  # blocks that are not holes
        # Blocks from this index on do not fit the main blob: overflow blob, slot map.
        self.ident_blocks = store.size_limit // (block_size + blocks.OVERHEAD)
        self.ovf_id: bytes | None = None
        self.ovf_fd = -1
        self.slots: dict[int, int] = {}  # block index -> slot in the overflow blob
        self.free_slots: list[int] = []
        self.next_slot = 0

    def __repr__(self) -> str:
        return f"<FileContent size={self.size} blocks={self.allocated}>"

    # --- blob and fd management ------------------------------------------------------------
    def ready(self, create: bool = False) -> int:
        """Open the blobs' fds if the file has blobs; with *create* (a write), first make the
        blob and key if the file has none. Returns the main blob's fd (-1 without a blob).

        The FUSE layer calls this on the trio thread under the inode's lock
        (OpenFileTable.using), so worker threads find the fds open and never open or close one.
        """
        if self.blob_id is None:
            if not create:
                return -1
            self.budget.reserve(CONTENT_COST)
            try:
                self.blob_id, self.fd = self.store.new_blob()
            except OSError:
                self.budget.adjust(-CONTENT_COST)
                raise
            self.key = FileKey.new()
        elif self.fd < 0:
            self.fd = self.store.open_blob(self.blob_id)
        if self.ovf_id is not None and self.ovf_fd < 0:
            self.ovf_fd = self.store.open_blob(self.ovf_id)
        return self.fd

    def _main_fd(self) -> int:
        """The main blob's fd, made or reopened if ready() did not run (direct use, tests)."""
        fd = self.fd
        return fd if fd >= 0 else self.ready(create=True)

    def _overflow_fd(self) -> int:
        """The overflow blob's fd, creating the blob on first use."""
        if self.ovf_id is None:
            self.ovf_id, self.ovf_fd = self.store.new_blob()
        elif self.ovf_fd < 0:
            self.ovf_fd = self.store.open_blob(self.ovf_id)
        return self.ovf_fd

    def close_fd(self) -> None:
        """Close the blobs' fds (reopened on next use); keeps key and data."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.ovf_fd >= 0:
            os.close(self.ovf_fd)
            self.ovf_fd = -1

    def destroy(self) -> None:
        """Crypto-shred: drop the key, then remove the blob."""
        self.close_fd()
        if self.key is not None:
            self.key.destroy()
            self.key = None
        if self.blob_id is not None:
            self.store.remove_blob(self.blob_id)
            self.blob_id = None
            self.budget.adjust(-CONTENT_COST)
        if self.ovf_id is not None:
            self.store.remove_blob(self.ovf_id)
            self.ovf_id = None
        self.versions = array("Q")
        self.far = {}
        self.slots = {}
        self.free_slots = []
        self.size = 0
        self.allocated = 0
        self._settle()

    def sync(self, datasync: bool) -> None:
        """fsync/fdatasync the blob (durable for the life of the mount, nothing more)."""
        if self.blob_id is None:
            return
        fd = self._main_fd()
        fds = [fd] if self.ovf_id is None else [fd, self._overflow_fd()]
        for one in fds:
            if datasync:
                os.fdatasync(one)
            else:
                os.fsync(one)

    @property
    def st_blocks(self) -> int:
        """Allocated 512-byte units, as stat reports them."""
        allocated_bytes = min(self.size, self.allocated * self.block_size)
        return (allocated_bytes + 511) // 512

    # --- helpers -----------------------------------------------------------------------------
    def _version(self, index: int) -> int:
        return self.versions[index] if index < len(self.versions) else self.far.get(index, 0)

    def _set_version(self, index: int, version: int) -> None:
        versions = self.versions
        far = self.far
        n = len(versions)
        if index < n:
            old = versions[index]
            versions[index] = version
        elif index <= n + DENSE_SLACK:
            versions.extend(array("Q", bytes(8 * (index + 1 - n))))
            if far:  # far blocks now inside the array move into it
                for i in range(n, index + 1):
                    moved = far.pop(i, 0)
                    if moved:
                        versions[i] = moved
            old = versions[index]
            versions[index] = version
        else:
            old = far.get(index, 0)
            if version:
                far[index] = version
            elif old:
                del far[index]
        if old == 0 and version != 0:
            self.allocated += 1
        elif old != 0 and version == 0:
            self.allocated -= 1

    def _check_growth(self, first: int, last: int) -> bool:
        """ENOSPC before a write if recording versions for blocks first..last could exceed the budget.

        An upper bound (the real cost is settled afterwards by _settle): near the array's end the
        array grows to last + 1; elsewhere each block may need a dict entry. Returns whether the
        map may grow (False on the hot path: overwriting inside the array).
        """
        n = len(self.versions)
        if last < n:
            return False
        if first <= n + DENSE_SLACK:
            need = (last + 1 - n) * DENSE_VERSION_COST
        else:
            need = (last + 1 - first) * FAR_VERSION_COST
        if last >= self.ident_blocks:  # and a slot entry each
            need += (last + 1 - max(first, self.ident_blocks)) * FAR_VERSION_COST
        self.budget.check(need)
        return True

    def _settle(self) -> None:
        """Charge the budget with what the version map costs now (the array's capacity counts)."""
        cost = (
            len(self.versions) * DENSE_VERSION_COST
            + (len(self.far) + len(self.slots)) * FAR_VERSION_COST
            + len(self.free_slots) * DENSE_VERSION_COST
        )
        if cost != self.charged:
            self.budget.adjust(cost - self.charged)
            self.charged = cost

    def _take_version(self) -> int:
        version = self.next_version
        self.next_version += 1
        return version

    def _check_blob_len(self, fd: int, first: int, last: int) -> None:
        """A blob longer than this process wrote fails the reads of its last record's block.

        (A shorter blob fails exactly the blocks whose records are cut; _read_blocks sees that.)
        Only the blocks concerned fail: the rest of the file stays readable.
        """
        last_record = max(0, self.blob_len - 1) // (self.block_size + blocks.OVERHEAD)
        if last < last_record:
            return  # an extension cannot concern these blocks: skip the size check on the hot path
        actual = file_size(fd)
        if actual > self.blob_len:
            if last >= last_record:
                raise IntegrityError(
                    f"blob is {actual} bytes, expected {self.blob_len} (extended)", max(first, last_record)
                )

    def _read_blocks(self, first: int, last: int) -> bytearray:
        """Authenticated plaintext of blocks first..last, concatenated (each at full logical length)."""
        bs = self.block_size
        size = self.size
        out = bytearray(max(0, min(size, (last + 1) * bs) - first * bs))
        if self.blob_id is None:
            return out
        if last >= self.ident_blocks:
            return self._read_overflow(first, last, out)
        fd = self._main_fd()
        base = blocks.record_offset(first, bs)
        end = blocks.record_offset(last, bs) + blocks.block_length(last, size, bs) + blocks.OVERHEAD
        self._check_blob_len(fd, first, last)
        # Past the blob's length there is nothing this process wrote (only holes, checked
        # below); no pread there, which also keeps offsets near 2^63 away from off_t's limit.
        raw = os.pread(fd, end - base, base) if base < self.blob_len else b""
        if len(raw) < end - base:
            # Past the blob's end only holes may lie; pad so the hole check sees zeros there.
            for index in range(first, last + 1):
                rec_end = blocks.record_offset(index, bs) + blocks.block_length(index, size, bs) + blocks.OVERHEAD
                if self._version(index) and rec_end > base + len(raw):
                    raise IntegrityError("record missing (blob truncated)", index)
            raw = raw + bytes(end - base - len(raw))
        view = memoryview(raw)
        out_view = memoryview(out)
        key, blob_id, versions, far = self.key, self.blob_id, self.versions, self.far
        nversions = len(versions)
        record_size = bs + blocks.OVERHEAD
        for index in range(first, last + 1):
            plain_len = bs if (index + 1) * bs <= size else size - index * bs
            start = (index - first) * record_size
            record = view[start : start + plain_len + blocks.OVERHEAD]
            version = versions[index] if index < nversions else far.get(index, 0)
            if version == 0:
                if not blocks.is_zero(record):
                    raise IntegrityError("data found where a hole must be", index)
                continue  # out is already zero there
            assert key is not None
            pstart = (index - first) * bs
            blocks.open_block_into(key, blob_id, index, version, record, out_view[pstart : pstart + plain_len])
        return out

    def _read_overflow(self, first: int, last: int, out: bytearray) -> bytearray:
        """_read_blocks for a range reaching into the overflow blob (one pread per record)."""
        bs = self.block_size
        record_size = bs + blocks.OVERHEAD
        start = first
        if first < self.ident_blocks:
            head = self._read_blocks(first, self.ident_blocks - 1)
            out[: len(head)] = head
            start = self.ident_blocks
        out_view = memoryview(out)
        for index in range(start, last + 1):
            version = self._version(index)
            if version == 0:
                continue  # a hole: no record anywhere
            plain_len = blocks.block_length(index, self.size, bs)
            record = memoryview(
                os.pread(self._overflow_fd(), plain_len + blocks.OVERHEAD, self.slots[index] * record_size)
            )
            if len(record) < plain_len + blocks.OVERHEAD:
                raise IntegrityError("record missing (overflow blob truncated)", index)
            assert self.key is not None and self.blob_id is not None
            pstart = (index - first) * bs
            blocks.open_block_into(
                self.key, self.blob_id, index, version, record, out_view[pstart : pstart + plain_len]
            )
        return out

    # --- what `scratchfs verify` must read --------------------------------------------------------
    def check_runs(self, start: int) -> Iterator[tuple[int, int]]:
        """Runs (first, last) of block indices >= *start* that a full check must read, in order.

        That is every block this process wrote, and every block whose record area holds data
        in the backing store (SEEK_DATA on the blob): ciphertext put into a hole must be read
        to be caught. Everything else is a hole on both sides and reads as zeros by
        construction, so `verify` skips it. Needs the blob's fd open (ready()).
        """
        last_block = (self.size - 1) // self.block_size
        merged = heapq.merge(self._written_runs(start), self._backing_runs(start))
        current: tuple[int, int] | None = None
        for first, last in merged:
            first, last = max(first, start), min(last, last_block)
            if first > last:
                continue
            if current is not None and first <= current[1] + 1:
                current = (current[0], max(current[1], last))
                continue
            if current is not None:
                yield current
            current = (first, last)
        if current is not None:
            yield current

    def _written_runs(self, start: int) -> Iterator[tuple[int, int]]:
        versions = self.versions
        n = len(versions)
        i = start
        while i < n:
            if versions[i]:
                j = i
                while j + 1 < n and versions[j + 1]:
                    j += 1
                yield i, j
                i = j + 1
            else:
                i += 1
        far = sorted(k for k in self.far if k >= start)
        for _, group in itertools.groupby(enumerate(far), key=lambda p: p[1] - p[0]):
            indices = [k for _, k in group]
            yield indices[0], indices[-1]

    def _backing_runs(self, start: int) -> Iterator[tuple[int, int]]:
        if self.fd < 0:
            return
        record = self.block_size + blocks.OVERHEAD
        pos = start * record
        end = file_size(self.fd)
        while pos < end:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data past pos
                    return
                raise
            hole = os.lseek(self.fd, data, os.SEEK_HOLE)
            yield data // record, (hole - 1) // record
            pos = hole

    # --- the three content operations ------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes | memoryview:
        """Up to *length* plaintext bytes at *offset* (short at end of file).

        Returns a view into the decryption buffer rather than a copy: pyfuse3 replies from any
        contiguous buffer, and copying 1 MiB per streaming request is measurable.
        """
        if offset >= self.size or length <= 0:
            return b""
        length = min(length, self.size - offset)
        bs = self.block_size
        span = blocks.block_span(offset, length, bs)
        plain = self._read_blocks(span.start, span.stop - 1)
        start = offset - span.start * bs
        return memoryview(plain)[start : start + length]

    def write(self, offset: int, data: bytes | memoryview) -> int:
        """Write *data* at *offset*, growing the file if needed; returns len(data)."""
        length = len(data)
        if length == 0:
            return 0
        bs = self.block_size
        end = offset + length
        old_size = self.size
        new_size = max(old_size, end)
        fd = self._main_fd()
        runs: list[tuple[int, bytes | bytearray, list[int]]] = []
        # Growing past a short last block: it must be re-sealed at its new, longer length.
        old_last = (old_size - 1) // bs if old_size else -1
        if old_size % bs and old_last < offset // bs:
            runs.append(self._reseal_grown(old_last, new_size))
        first = offset // bs
        last = (end - 1) // bs
        grows = self._check_growth(first, last)
        view = memoryview(data)
        old_plain: dict[int, bytearray] = {}
        for index in {first, last}:
            if self._is_partial(index, offset, end, new_size) and index * bs < old_size:
                old_plain[index] = self._read_blocks(index, index)
        assert self.key is not None and self.blob_id is not None
        key, blob_id = self.key, self.blob_id
        base = blocks.record_offset(first, bs)
        buf = bytearray(
            blocks.record_offset(last, bs) + blocks.block_length(last, new_size, bs) + blocks.OVERHEAD - base
        )
        out = memoryview(buf)
        record_size = bs + blocks.OVERHEAD
        versions: list[int] = []
        for index in range(first, last + 1):
            bstart = index * bs
            plain_len = bs if bstart + bs <= new_size else new_size - bstart
            lo = offset if offset > bstart else bstart
            hi = end if end < bstart + bs else bstart + bs
            if lo == bstart and hi == bstart + plain_len:
                plain: bytes | bytearray | memoryview = view[lo - offset : hi - offset]
            else:
                merged = bytearray(plain_len)
                old = old_plain.get(index)
                if old is not None:
                    keep = min(len(old), plain_len)
                    merged[:keep] = old[:keep]
                merged[lo - bstart : hi - bstart] = view[lo - offset : hi - offset]
                plain = merged
            version = self._take_version()
            rstart = (index - first) * record_size
            blocks.seal_block_into(
                key, blob_id, index, version, plain, out[rstart : rstart + plain_len + blocks.OVERHEAD]
            )
            versions.append(version)
        runs.append((first, buf, versions))
        try:
            self._write_runs(fd, runs)
        finally:
            if grows:
                self._settle()
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
        fd = self._main_fd()
        if new_size > old_size:
            if old_size % bs:
                self._write_runs(fd, [self._reseal_grown((old_size - 1) // bs, new_size)])
                self._settle()  # the re-sealed block may be a new version entry
            self.size = new_size
            return
        keep = blocks.block_count(new_size, bs)
        tail = new_size % bs
        if tail and self._version(keep - 1):
            plain = self._read_blocks(keep - 1, keep - 1)[:tail]
            # The shortened record goes in before the blob is cut, so a failure leaves the old state.
            self._write_runs(fd, [self._seal_one(keep - 1, plain)])
        for index in range(keep, len(self.versions)):
            self._set_version(index, 0)
        del self.versions[keep:]
        for index in [i for i in self.far if i >= keep]:
            self._set_version(index, 0)
        for index in [i for i in self.slots if i >= keep]:
            self.free_slots.append(self.slots.pop(index))
        self._settle()
        if tail:
            cut = blocks.record_offset(keep - 1, bs) + tail + blocks.OVERHEAD
        else:
            cut = blocks.record_offset(keep, bs)
        new_blob_len = min(self.blob_len, cut)
        os.ftruncate(fd, new_blob_len)
        self.blob_len = new_blob_len
        self.size = new_size

    def make_holes(self, fd: int, first: int, last: int, punch_backing: Callable[[int, int, int], None]) -> None:
        """Blocks first..last become holes (fallocate.py): records zeroed by *punch_backing* first."""
        indices = [i for i in range(first, min(last + 1, len(self.versions))) if self.versions[i]]
        indices += sorted(i for i in self.far if first <= i <= last)
        main = [i for i in indices if i < self.ident_blocks]
        for _, group in itertools.groupby(enumerate(main), key=lambda p: p[1] - p[0]):
            run = [i for _, i in group]
            start = blocks.record_offset(run[0], self.block_size)
            stop = min(self.blob_len, blocks.record_offset(run[-1] + 1, self.block_size))
            if stop > start:
                punch_backing(fd, start, stop - start)
        for index in indices:
            if index in self.slots:
                self.free_slots.append(self.slots.pop(index))
            self._set_version(index, 0)
        self._settle()

    # --- write plumbing ----------------------------------------------------------------------
    def _is_partial(self, index: int, offset: int, end: int, new_size: int) -> bool:
        bstart = index * self.block_size
        plain_len = blocks.block_length(index, new_size, self.block_size)
        return not (offset <= bstart and end >= bstart + plain_len)

    def _seal_one(self, index: int, plain: bytes | bytearray) -> tuple[int, bytes, list[int]]:
        assert self.key is not None and self.blob_id is not None
        version = self._take_version()
        record = blocks.seal_record(self.key, self.blob_id, index, version, plain)
        return index, record, [version]

    def _reseal_grown(self, index: int, new_size: int) -> tuple[int, bytes, list[int]]:
        """Re-seal the old short last block *index*, zero-extended to its length at *new_size*."""
        new_len = blocks.block_length(index, new_size, self.block_size)
        plain = self._read_blocks(index, index) if self._version(index) else bytearray()
        plain.extend(bytes(new_len - len(plain)))
        return self._seal_one(index, plain)

    def _write_overflow_run(self, fd: int, first: int, data: bytes | bytearray, versions: list[int]) -> None:
        """A run reaching past the main blob: each overflow record to a fresh slot, then the head
        as usual; versions and slots change only once everything landed (as for one pwrite)."""
        record_size = self.block_size + blocks.OVERHEAD
        head = max(0, self.ident_blocks - first)
        ovf = self._overflow_fd()
        view = memoryview(data)
        taken: list[int] = []
        try:
            for i in range(head, len(versions)):
                if self.free_slots:
                    slot = self.free_slots.pop()
                else:
                    slot = self.next_slot
                    self.next_slot += 1
                taken.append(slot)
                record = view[i * record_size : (i + 1) * record_size]
                if os.pwrite(ovf, record, slot * record_size) != len(record):
                    raise OSError(errno.ENOSPC, "short write to the backing store")
            if head:
                self._write_runs(fd, [(first, data[: head * record_size], versions[:head])])
        except OSError:
            self.free_slots.extend(taken)
            raise
        for i, slot in zip(range(head, len(versions)), taken, strict=True):
            index = first + i
            old = self.slots.get(index)
            if old is not None:
                self.free_slots.append(old)
            self.slots[index] = slot
            self._set_version(index, versions[i])

    def _write_runs(self, fd: int, runs: list[tuple[int, bytes | bytearray, list[int]]]) -> None:
        """Write runs of consecutive records; versions change only once a run has landed.

        If the backing store fails (ENOSPC, EIO), blocks that were not rewritten keep their old
        version and stay readable; a blob extended by a failed write is cut back.
        """
        bs = self.block_size
        for first, data, versions in runs:
            if first + len(versions) > self.ident_blocks:
                self._write_overflow_run(fd, first, data, versions)
                continue
            offset = blocks.record_offset(first, bs)
            try:
                written = os.pwrite(fd, data, offset)
                if written != len(data):
                    raise OSError(28, "short write to the backing store")
            except OSError:
                if file_size(fd) > self.blob_len:
                    os.ftruncate(fd, self.blob_len)
                raise
            for i, version in enumerate(versions):
                self._set_version(first + i, version)
            self.blob_len = max(self.blob_len, offset + len(data))
