"""The backing blob store: a directory holding a marker file and opaque blobs, nothing else.

Blob names are 128-bit random ids in hex. The marker file identifies the directory as a
scratchfs store so that we never wipe a directory that belongs to someone else.

Blobs are pinned to what this daemon created: each blob's (st_dev, st_ino) is recorded when it
is made, and every reopen checks the opened fd itself (statx of the fd, so no race with the
name): same inode, one link, owned by us, a regular file. Anything else (a hard link to someone's file
planted at the name, another file swapped in, a FIFO, a device) is an IntegrityError before a
single byte is read, written or truncated through it. Removal only ever unlinks the name, so a
planted link's target is never touched.

The pin checks never ask for a blob's timestamps (statx without STATX_CTIME/STATX_MTIME, see
identity()): on a kernel with multigrain timestamps (6.13+; ext4, xfs, btrfs, tmpfs) a query
of a file's ctime makes its next change take a fine-grained time and raise the kernel-wide
timestamp floor, so for the rest of that clock tick the kernel's current_time() runs ahead of
CLOCK_REALTIME_COARSE, the daemon's clock (tree.now_ns). With the writeback cache the kernel
then finds that a new file's times "changed" at its first write and flushes them with one
SETATTR per file at close: 2,898 extra requests extracting a 3,000-file tree.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import secrets
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

from scratchfs.errors import IntegrityError, StoreError

log = logging.getLogger("scratchfs.store")

MARKER_NAME = ".scratchfs"
MARKER_MAGIC = b"scratchfs-store"
MARKER_VERSION = 1
MARKER_MAX_BYTES = 256
BLOB_NAME_LEN = 32


def marker_bytes() -> bytes:
    """The marker file's content (no secret: it only says what the directory is)."""
    return b"%s v%d\n" % (MARKER_MAGIC, MARKER_VERSION)


def parse_marker(data: bytes) -> int:
    """Parse a marker file's bytes; returns the format version or raises ValueError."""
    if len(data) > MARKER_MAX_BYTES:
        raise ValueError("marker file too large")
    line = data.split(b"\n", 1)[0].strip()
    magic, _, version = line.partition(b" ")
    if magic != MARKER_MAGIC or not version.startswith(b"v") or not version[1:].isdigit():
        raise ValueError("not a scratchfs marker")
    number = int(version[1:])
    if number != MARKER_VERSION:
        raise ValueError(f"unsupported store format v{number}")
    return number


class _Statx(ctypes.Structure):
    """struct statx (include/uapi/linux/stat.h) up to the device numbers; padded to its 256 bytes."""

    _fields_ = [
        ("stx_mask", ctypes.c_uint32),
        ("stx_blksize", ctypes.c_uint32),
        ("stx_attributes", ctypes.c_uint64),
        ("stx_nlink", ctypes.c_uint32),
        ("stx_uid", ctypes.c_uint32),
        ("stx_gid", ctypes.c_uint32),
        ("stx_mode", ctypes.c_uint16),
        ("_spare0", ctypes.c_uint16),
        ("stx_ino", ctypes.c_uint64),
        ("stx_size", ctypes.c_uint64),
        ("stx_blocks", ctypes.c_uint64),
        ("stx_attributes_mask", ctypes.c_uint64),
        ("_times", ctypes.c_uint8 * 64),  # atime, btime, ctime, mtime: never asked for
        ("stx_rdev_major", ctypes.c_uint32),
        ("stx_rdev_minor", ctypes.c_uint32),
        ("stx_dev_major", ctypes.c_uint32),
        ("stx_dev_minor", ctypes.c_uint32),
        ("_rest", ctypes.c_uint8 * 112),
    ]


AT_EMPTY_PATH = 0x1000
AT_STATX_SYNC_AS_STAT = 0
STATX_TYPE, STATX_MODE, STATX_NLINK, STATX_UID, STATX_INO = 0x1, 0x2, 0x4, 0x8, 0x100
STATX_IDENTITY = STATX_TYPE | STATX_MODE | STATX_NLINK | STATX_UID | STATX_INO


class Identity:
    """What a pin check needs of an open file (no timestamps: see the module docstring)."""

    __slots__ = ("st_dev", "st_ino", "st_mode", "st_nlink", "st_uid")

    def __init__(self, st_dev: int, st_ino: int, st_mode: int, st_nlink: int, st_uid: int) -> None:
        self.st_dev = st_dev
        self.st_ino = st_ino
        self.st_mode = st_mode
        self.st_nlink = st_nlink
        self.st_uid = st_uid


def _libc_statx() -> Callable[..., int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).statx  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(_Statx)]
    fn.restype = ctypes.c_int
    return fn


_statx = _libc_statx()


def identity(fd: int) -> Identity:
    """Type, mode, links, owner, device and inode of *fd*, without querying its timestamps.

    statx(fd, "", AT_EMPTY_PATH, STATX_TYPE|MODE|NLINK|UID|INO): a statx that asks for neither
    ctime nor mtime leaves the inode's "ctime queried" flag alone (fs/stat.c fill_mg_cmtime),
    where fstat(2) sets it. Falls back to fstat where statx is missing.
    """
    global _statx
    if _statx is not None:
        buf = _Statx()
        if _statx(fd, b"", AT_EMPTY_PATH | AT_STATX_SYNC_AS_STAT, STATX_IDENTITY, ctypes.byref(buf)) == 0:
            if buf.stx_mask & STATX_IDENTITY == STATX_IDENTITY:
                return Identity(
                    os.makedev(buf.stx_dev_major, buf.stx_dev_minor),
                    buf.stx_ino,
                    buf.stx_mode,
                    buf.stx_nlink,
                    buf.stx_uid,
                )
        else:
            err = ctypes.get_errno()
            if err == errno.ENOSYS:
                _statx = None  # seccomp or an old kernel: fstat from now on
            elif err != errno.EPERM:  # EPERM: some seccomp filters answer statx so
                raise OSError(err, os.strerror(err))
    st = os.fstat(fd)
    return Identity(st.st_dev, st.st_ino, st.st_mode, st.st_nlink, st.st_uid)


def file_size(fd: int) -> int:
    """Size of the open file *fd* (lseek to the end: no stat, so no timestamp query either).
    Blob I/O is all positional (pread/pwrite), so moving the file offset changes nothing."""
    return os.lseek(fd, 0, os.SEEK_END)


def is_blob_name(name: str) -> bool:
    """True for names this module generates for blobs."""
    return len(name) == BLOB_NAME_LEN and all(c in "0123456789abcdef" for c in name)


class BlobStore:
    """A validated backing directory. Open with `BlobStore.open(path)`."""

    def __init__(self, root: Path, dir_fd: int) -> None:
        self.root = root
        self._dir_fd = dir_fd
        self._uid = os.geteuid()
        # blob id -> (st_dev, st_ino) at creation; one entry per live file with content.
        self._pins: dict[bytes, tuple[int, int]] = {}
        self._size_limit: int | None = None
        # Set by the daemon while it serves: queues a removal off the request path and returns
        # True, or False when its queue is full (scratchfs/reaper.py). None: remove inline.
        self.defer_removal: Callable[[str], bool] | None = None
        # ... and removes everything still queued, now; returns how many (see free_queued).
        self.drain_removals: Callable[[], int] | None = None

    @property
    def size_limit(self) -> int:
        """The largest blob the backing filesystem holds (probed once, see max_blob_size)."""
        if self._size_limit is None:
            self._size_limit = self.max_blob_size()
        return self._size_limit

    @size_limit.setter
    def size_limit(self, value: int) -> None:
        # Lowered by tests to exercise overflow blobs without writing near 16 TiB.
        self._size_limit = value

    @classmethod
    def check(cls, root: Path) -> None:
        """Validate *root* as open() would, without creating or deleting anything."""
        cls._validate(root)

    @classmethod
    def _validate(cls, root: Path) -> list[str]:
        try:
            st = os.stat(root)
        except FileNotFoundError:
            raise StoreError(f"{root} does not exist; create an empty directory for the store") from None
        except OSError as e:
            raise StoreError(f"cannot access {root}: {e.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise StoreError(f"{root} is not a directory; give an empty directory for the store")
        try:
            names = os.listdir(root)
        except OSError as e:
            raise StoreError(f"cannot read {root}: {e.strerror}") from None
        foreign = [n for n in names if n != MARKER_NAME and not is_blob_name(n)]
        if foreign:
            raise StoreError(
                f"{root} holds files that are not a scratchfs store (found {sorted(foreign)[0]!r}); "
                "use an empty directory"
            )
        if names and MARKER_NAME not in names:
            raise StoreError(f"{root} holds blob-like files but no {MARKER_NAME} marker; use an empty directory")
        if MARKER_NAME in names:
            try:
                with open(os.path.join(root, MARKER_NAME), "rb") as f:
                    parse_marker(f.read(MARKER_MAX_BYTES + 1))
            except (OSError, ValueError) as e:
                raise StoreError(
                    f"{root}/{MARKER_NAME} is not a valid scratchfs marker ({e}); use an empty directory"
                ) from None
        return names

    @classmethod
    def open(cls, root: Path) -> BlobStore:
        """Validate *root*, claim it (marker) if empty, and wipe blobs a crashed daemon left.

        Raises StoreError (touching nothing) if the directory is missing, not a directory, or
        holds anything that is not ours.
        """
        names = cls._validate(root)
        dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        store = cls(root, dir_fd)
        if MARKER_NAME in names:
            store._check_marker()
        else:
            store._write_marker()
        leftovers = store.wipe_all()
        if leftovers:
            log.info("event=wipe_leftovers count=%d reason=previous_daemon_did_not_clean_up", leftovers)
        return store

    def _check_marker(self) -> None:
        try:
            fd = os.open(MARKER_NAME, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=self._dir_fd)
            try:
                data = os.read(fd, MARKER_MAX_BYTES + 1)
            finally:
                os.close(fd)
            parse_marker(data)
        except (OSError, ValueError) as e:
            os.close(self._dir_fd)
            raise StoreError(
                f"{self.root}/{MARKER_NAME} is not a valid scratchfs marker ({e}); use an empty directory"
            ) from None

    def _write_marker(self) -> None:
        fd = os.open(MARKER_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=self._dir_fd)
        try:
            os.write(fd, marker_bytes())
            os.fsync(fd)
        finally:
            os.close(fd)

    def new_blob(self) -> tuple[bytes, int]:
        """Create an empty blob with a fresh random id; returns (id, read-write fd)."""
        while True:
            blob_id = secrets.token_bytes(16)
            try:
                fd = os.open(
                    blob_id.hex(), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=self._dir_fd
                )
            except FileExistsError:
                continue
            try:
                st = identity(fd)
            except OSError:
                os.close(fd)
                os.unlink(blob_id.hex(), dir_fd=self._dir_fd)
                raise
            self._pins[blob_id] = (st.st_dev, st.st_ino)
            return blob_id, fd

    def open_blob(self, blob_id: bytes) -> int:
        """Open an existing blob read-write (EIO if it vanished: someone deleted it)."""
        try:
            fd = os.open(blob_id.hex(), os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=self._dir_fd)
        except FileNotFoundError:
            raise IntegrityError("blob missing from the backing store") from None
        except OSError as e:
            # A directory, symlink or other object where our blob was: someone replaced it.
            raise IntegrityError(
                f"blob replaced by something else ({errno.errorcode.get(e.errno or 0, e.errno)})"
            ) from None
        try:
            self._check_pinned(blob_id, identity(fd))
        except (IntegrityError, OSError):
            os.close(fd)
            raise
        os.set_blocking(fd, True)
        return fd

    def _check_pinned(self, blob_id: bytes, st: Identity | os.stat_result) -> None:
        """The opened object must be the very file we created for *blob_id*, and only ours."""
        if not stat.S_ISREG(st.st_mode):
            raise IntegrityError("blob replaced by a non-regular file")
        pin = self._pins.get(blob_id)
        if pin is None or (st.st_dev, st.st_ino) != pin:
            raise IntegrityError("blob replaced by another file (inode changed)")
        if st.st_nlink != 1:
            raise IntegrityError(f"blob has {st.st_nlink} links (a hard link was planted)")
        if st.st_uid != self._uid:
            raise IntegrityError(f"blob owned by uid {st.st_uid}, not by the daemon")

    def remove_blob(self, blob_id: bytes) -> None:
        """Delete a blob's name (already crypto-shredded by dropping its key), possibly deferred.

        Unlink only: whatever sits at the name now (maybe a hard link an attacker planted to
        someone's file) loses that name and nothing else.
        """
        self._pins.pop(blob_id, None)
        name = blob_id.hex()
        if self.defer_removal is not None and self.defer_removal(name):
            return
        self._remove(name)

    def free_queued(self) -> int:
        """Remove the queued blobs of shredded files at once; returns how many were queued.

        For ENOSPC/EDQUOT: space a deletion freed must be usable right away, as on any
        filesystem, even while its blob still waits in the removal queue."""
        return self.drain_removals() if self.drain_removals is not None else 0

    def remove_now(self, name: str) -> bool:
        """Delete the blob called *name* now (the reaper's worker thread); never raises."""
        return self._remove(name)

    def _remove(self, name: str) -> bool:
        """Remove whatever sits at a blob's name (an attacker may have put a directory there).

        Never raises: shredding must go on for every other blob. Returns True if something was removed.
        """
        try:
            os.unlink(name, dir_fd=self._dir_fd)
            return True
        except FileNotFoundError:
            return False
        except IsADirectoryError:
            shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
            return True
        except OSError as e:
            log.warning("event=blob_remove_failed name=%s errno=%s", name, errno.errorcode.get(e.errno or 0, e.errno))
            return False

    def wipe_all(self) -> int:
        """Delete every blob in the store; returns how many there were."""
        count = 0
        self._pins.clear()
        for name in os.listdir(self._dir_fd):
            if is_blob_name(name) and self._remove(name):
                count += 1
        return count

    def max_blob_size(self) -> int:
        """The largest size the backing filesystem lets a blob have (its s_maxbytes).

        Found by binary search with ftruncate on a scratch blob (sparse on every filesystem we
        back onto: nothing is written), ~63 calls at mount; ext4 answers 2^44 - 4096, tmpfs
        2^63 - 1. No statvfs/pathconf field says it (pathconf FILESIZEBITS is 32 on tmpfs).
        """
        blob_id, fd = self.new_blob()
        try:
            lo, hi = 0, (1 << 63) - 1  # lo: known to fit; answer in [lo, hi]
            while lo < hi:
                mid = (lo + hi + 1) // 2
                try:
                    os.ftruncate(fd, mid)
                    lo = mid
                except OSError as e:
                    if e.errno not in (errno.EFBIG, errno.EINVAL):
                        raise
                    hi = mid - 1
            return lo
        finally:
            os.close(fd)
            self.remove_blob(blob_id)

    def statvfs(self) -> os.statvfs_result:
        """statvfs of the backing filesystem."""
        return os.statvfs(self._dir_fd)

    def close(self) -> None:
        """Release the directory handle."""
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1
