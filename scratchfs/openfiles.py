"""The open-file table: file handles, per-inode locks and the lifetime of blob fds.

After gocryptfs's `openfiletable`: one owner for what every open file shares, beside the FUSE
operations instead of inside them. Nothing here knows FUSE; a handle number is just an int the
FUSE layer hands to the kernel.

Rules this table keeps:
- a handle counts as one `Inode.opens` from `open()` to `close()`;
- an inode's lock lives while anyone holds or waits for it, and is dropped with the inode;
- a file's blob fd stays open while the file has handles or a lock holder, and is closed when
  the last of them goes (reopened on next use, which re-checks the blob: store.open_blob).

Every use of a file's content goes through `using()`, which keeps these rules in one place:

    async with table.using(node, write=True) as content:
        content.write(offset, data)
"""

from __future__ import annotations

import errno
from types import TracebackType

from scratchfs.content import FileContent
from scratchfs.errors import FsError, IntegrityError
from scratchfs.locks import RWLock
from scratchfs.tree import Inode

__all__ = ["Handle", "OpenFileTable"]


class Handle:
    """An open file: the inode it refers to, and whether writes through it must clear
    setuid/setgid (opened by a process without privilege)."""

    __slots__ = ("kill_suid", "node")

    def __init__(self, node: Inode, kill_suid: bool = False) -> None:
        self.node = node
        self.kill_suid = kill_suid


class OpenFileTable:
    """Handles by number and locks by inode number.

    Bounds: one handle per kernel open (the kernel bounds those by its own fd limits), one lock
    per inode that has a lock holder or waiter or is still in the namespace (bounded by the
    inode table).
    """

    __slots__ = ("_handles", "_locks", "_next_fh")

    def __init__(self) -> None:
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._locks: dict[int, RWLock] = {}

    def __len__(self) -> int:
        return len(self._handles)

    def open(self, node: Inode, kill_suid: bool = False) -> int:
        """Register a new handle on *node*; returns its number."""
        node.opens += 1
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = Handle(node, kill_suid)
        return fh

    def get(self, fh: int) -> Handle:
        """The handle *fh*; EBADF if it is not open."""
        h = self._handles.get(fh)
        if h is None:
            raise FsError(errno.EBADF)
        return h

    def close(self, fh: int) -> Inode | None:
        """Drop handle *fh*; returns its inode (None if it was not open).

        The last handle closes the blob's fd unless a lock holder is still using it.
        """
        h = self._handles.pop(fh, None)
        if h is None:
            return None
        node = h.node
        node.opens -= 1
        if node.opens == 0 and node.content is not None:
            lock = self._locks.get(node.ino)
            if lock is None or lock.idle:
                node.content.close_fd()
        return node

    def using(self, node: Inode, *, write: bool) -> _Using:
        """``async with table.using(node, write=...) as content:`` the file's content, with its
        lock held (exclusive for *write*, else shared) and its blob fds open (made on the trio
        thread, so worker threads only use them; *write* also creates the blob and key on the
        first write). On leaving, the lock is released and the fds are closed if no handle and
        no other lock holder or waiter remains.

        *node* must have content (a regular file's engine, made by the caller). Errors from
        opening the blob (IntegrityError for a missing or replaced blob, OSError) propagate
        with nothing held; an IntegrityError leaving the block carries the inode number (`ino`).
        """
        return _Using(node, self.lock(node), write)

    def lock(self, node: Inode) -> RWLock:
        """*node*'s readers-writer lock (made on first use)."""
        lock = self._locks.get(node.ino)
        if lock is None:
            lock = self._locks[node.ino] = RWLock()
        return lock

    def busy(self, node: Inode) -> bool:
        """Whether someone holds or waits for *node*'s lock (then its blob fd is in use)."""
        lock = self._locks.get(node.ino)
        return lock is not None and not lock.idle

    def forget_lock(self, node: Inode) -> None:
        """*node* left the inode table: drop its lock unless someone still holds or waits for it."""
        lock = self._locks.get(node.ino)
        if lock is not None and lock.idle:
            del self._locks[node.ino]

    def clear(self) -> None:
        """Unmount: forget every handle."""
        self._handles.clear()


class _Using:
    """One use of a file's content under its lock (OpenFileTable.using). A plain class, not a
    generator-based context manager: it runs on every read and write request."""

    __slots__ = ("_content", "_lock", "_node", "_write")

    def __init__(self, node: Inode, lock: RWLock, write: bool) -> None:
        if node.content is None:
            raise ValueError("using() needs an inode with content")
        self._node = node
        self._content: FileContent = node.content
        self._lock = lock
        self._write = write

    async def __aenter__(self) -> FileContent:
        if self._write:
            await self._lock.acquire_write()
        else:
            await self._lock.acquire_read()
        try:
            self._content.ready(create=self._write)
        except BaseException as e:
            self._leave()
            self._stamp(e)
            raise
        return self._content

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._leave()
        if exc is not None:
            self._stamp(exc)

    def _stamp(self, exc: BaseException) -> None:
        if isinstance(exc, IntegrityError) and exc.ino is None:
            exc.ino = self._node.ino

    def _leave(self) -> None:
        if self._write:
            self._lock.release_write()
        else:
            self._lock.release_read()
        if self._node.opens == 0 and self._lock.idle:
            self._content.close_fd()
