"""The backing blob store: a directory holding a marker file and opaque blobs, nothing else.

Blob names are 128-bit random ids in hex. The marker file identifies the directory as a
scratchfs store so that we never wipe a directory that belongs to someone else.

Blobs are pinned to what this daemon created: each blob's (st_dev, st_ino) is recorded when it
is made, and every reopen checks the opened fd itself (fstat, so no race with the name): same
inode, one link, owned by us, a regular file. Anything else (a hard link to someone's file
planted at the name, another file swapped in, a FIFO, a device) is an IntegrityError before a
single byte is read, written or truncated through it. Removal only ever unlinks the name, so a
planted link's target is never touched.
"""

from __future__ import annotations

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
            st = os.fstat(fd)
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
            self._check_pinned(blob_id, os.fstat(fd))
        except IntegrityError:
            os.close(fd)
            raise
        os.set_blocking(fd, True)
        return fd

    def _check_pinned(self, blob_id: bytes, st: os.stat_result) -> None:
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
