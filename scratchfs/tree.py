"""The in-memory namespace: inodes, directories, links, lookup and open counts. Pure logic.

Nothing here touches files or FUSE. Operations raise FsError(errno); the FUSE layer translates.
An inode is dropped only when it has no name (nlink 0), the kernel holds no reference to it
(lookups 0) and no handle is open (opens 0); the caller is then told so it can destroy the
file's key and remove its blob.
"""

from __future__ import annotations

import bisect
import errno
import stat
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

ROOT_INO = 1
NAME_MAX = 255
PATH_MAX = 4096
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
CLOCK_REALTIME_COARSE = getattr(time, "CLOCK_REALTIME_COARSE", 5)  # Linux's id; Python does not export it

from scratchfs.errors import FsError  # noqa: E402
from scratchfs.limits import (  # noqa: E402
    DIR_OBJECT_COST,
    ENTRY_COST,
    INODE_COST,
    Limits,
    MemoryBudget,
    appended_after,
    bytes_cost,
    dict_growth,
    list_growth,
    owner_request,
)

if TYPE_CHECKING:  # for the annotation only: the namespace never touches content
    from scratchfs.content import FileContent


class Directory:
    """A directory's entries with readdir cookies that stay valid under modification.

    Each entry gets a cookie from a per-directory counter when it is added; a listing resumed
    at cookie *c* returns exactly the live entries with a larger cookie, so an entry that was
    neither added nor removed is returned exactly once however the directory changes.
    """

    __slots__ = ("_appended", "_by_cookie", "_cookies", "_dead", "_entries", "_next_cookie")

    FIRST_COOKIE = 3  # 1 and 2 are "." and ".."

    def __init__(self) -> None:
        self._entries: dict[bytes, tuple[int, int]] = {}
        self._by_cookie: dict[int, bytes] = {}
        self._cookies: list[int] = []
        self._next_cookie = self.FIRST_COOKIE
        self._dead = 0
        self._appended = 0  # entries added to the two dicts since they were last rebuilt (limits.dict_growth)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: bytes) -> int | None:
        """The inode number for *name*, or None."""
        entry = self._entries.get(name)
        return entry[0] if entry else None

    def footprint(self) -> int:
        """Bytes its three containers take now (charged to the budget as they change)."""
        return sys.getsizeof(self._entries) + sys.getsizeof(self._by_cookie) + sys.getsizeof(self._cookies)

    def growth(self) -> int:
        """Bytes the next `add` may allocate on top of the entry itself (resizes of its containers)."""
        # Both dicts see the same insertions and removals, so they resize together.
        return 2 * dict_growth(self._entries, self._appended) + list_growth(self._cookies)

    def add(self, name: bytes, ino: int) -> None:
        """Add a new entry (the caller checked that *name* is free)."""
        cookie = self._next_cookie
        self._next_cookie += 1
        size_before = sys.getsizeof(self._entries)
        self._entries[name] = (ino, cookie)
        self._appended = appended_after(self._entries, size_before, self._appended)
        self._by_cookie[cookie] = name
        self._cookies.append(cookie)

    def replace(self, name: bytes, ino: int) -> None:
        """Point an existing entry at another inode, keeping its cookie (rename over, exchange)."""
        _, cookie = self._entries[name]
        self._entries[name] = (ino, cookie)

    def remove(self, name: bytes) -> int:
        """Remove *name*; returns the inode number it pointed to."""
        ino, cookie = self._entries.pop(name)
        del self._by_cookie[cookie]
        self._dead += 1
        if self._dead > 64 and self._dead > len(self._cookies) // 2:
            self._cookies = [c for c in self._cookies if c in self._by_cookie]
            self._dead = 0
        return ino

    def entries_after(self, cookie: int) -> Iterator[tuple[int, bytes, int]]:
        """Yield (cookie, name, ino) for live entries with a cookie greater than *cookie*."""
        cookies = self._cookies
        pos = bisect.bisect_right(cookies, cookie)
        while pos < len(cookies):
            c = cookies[pos]
            pos += 1
            name = self._by_cookie.get(c)
            if name is not None:
                entry = self._entries.get(name)
                if entry is not None and entry[1] == c:
                    yield c, name, entry[0]

    def names(self) -> list[bytes]:
        """All names, in creation order."""
        return list(self._entries)


EMPTY_DIRECTORY_FOOTPRINT = Directory().footprint()
EMPTY_XATTRS_GROWTH = sys.getsizeof({}) + dict_growth({}, 0)  # a new xattr dict and its first table


def _xattrs_cost(xattrs: dict[bytes, bytes]) -> int:
    """What an inode's xattrs are charged: their dict as sized, names and values as bytes."""
    return sys.getsizeof(xattrs) + sum(bytes_cost(len(k)) + bytes_cost(len(v)) for k, v in xattrs.items())


class Inode:
    """One file, directory or symlink. `content` is a regular file's content engine (None until
    the file's first use of content); the namespace only carries it."""

    __slots__ = (
        "atime_ns",
        "content",
        "ctime_ns",
        "directory",
        "gid",
        "ino",
        "lookups",
        "mode",
        "mtime_ns",
        "name_hint",
        "nlink",
        "opens",
        "rdev",
        "target",
        "uid",
        "xattrs",
    )

    def __init__(self, ino: int, mode: int, uid: int, gid: int, now_ns: int) -> None:
        self.ino = ino
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.nlink = 0
        self.rdev = 0
        self.atime_ns = self.mtime_ns = self.ctime_ns = now_ns
        self.xattrs: dict[bytes, bytes] | None = None
        self.directory: Directory | None = Directory() if stat.S_ISDIR(mode) else None
        self.target: bytes | None = None
        self.content: FileContent | None = None
        self.lookups = 0
        self.opens = 0
        # (parent ino, name) of one of this inode's names, for log lines only.
        self.name_hint: tuple[int, bytes] = (0, b"")

    @property
    def is_dir(self) -> bool:
        return self.directory is not None

    def __repr__(self) -> str:
        return f"<Inode ino={self.ino} mode={self.mode:o} nlink={self.nlink}>"


def now_ns() -> int:
    """The current time in nanoseconds (the namespace's clock).

    The coarse clock is the one the kernel stamps inodes with (current_time()); with the
    writeback cache the kernel sends its own times, and mixing a finer clock with it would make
    ctime/mtime run backwards. Since Linux 6.13 current_time() is the coarse clock or, within
    a tick, the multigrain floor if a fine-grained stamp raised it; the daemon must not raise
    it itself (no timestamp queries on blobs, store.identity), or a new file's first cached
    write would see "changed" times and cost a SETATTR at close.
    """
    return time.clock_gettime_ns(CLOCK_REALTIME_COARSE)


def check_name(name: bytes) -> None:
    """Reject names no POSIX filesystem accepts."""
    if len(name) > NAME_MAX:
        raise FsError(errno.ENAMETOOLONG)
    if not name or b"/" in name or name in (b".", b".."):
        raise FsError(errno.EINVAL)


class Namespace:
    """The inode table and every namespace operation.

    Bounded (limits.py): at most `limits.max_inodes` inodes (ENOSPC), and every inode, directory
    entry and xattr is charged to `budget` before it is made (ENOSPC when it is spent), with what
    it really costs: fixed-shape objects by measured constants, names and values by their size,
    and tables (the inode table, directories, xattr dicts) by their real size after each change.
    The last `limits.owner_reserve_percent` of both is left to the owner's requests
    (`limits.owner_request`).
    """

    def __init__(
        self,
        root_uid: int = 0,
        root_gid: int = 0,
        root_mode: int = 0o755,
        limits: Limits | None = None,
        budget: MemoryBudget | None = None,
    ) -> None:
        self.limits = limits if limits is not None else Limits()
        self.budget = (
            budget if budget is not None else MemoryBudget(self.limits.memory_budget, self.limits.reserved_bytes)
        )
        self._inodes: dict[int, Inode] = {}
        self._inodes_appended = 0  # entries added since the table was last rebuilt (limits.dict_growth)
        self._inodes_charged = 0  # sys.getsizeof(self._inodes) as charged to the budget
        self._next_ino = ROOT_INO
        root = self._new(stat.S_IFDIR | root_mode, root_uid, root_gid, 0, 0)
        root.nlink = 2
        root.name_hint = (ROOT_INO, b"")
        root.lookups = 1  # the kernel's reference to the root never goes away

    # --- inode table -------------------------------------------------------------------------
    def _new(self, mode: int, uid: int, gid: int, extra: int, headroom: int) -> Inode:
        """A new inode; ENOSPC past the inode or memory limit.

        Charges the inode itself, *extra* bytes (its first name, symlink target) and the inode
        table's growth; *headroom*: what the caller's next step may allocate (its directory's).
        """
        max_inodes = self.limits.max_inodes
        if not owner_request.get():
            max_inodes -= self.limits.reserved_inodes
        if len(self._inodes) >= max_inodes:
            raise self.budget.refuse("inodes")
        cost = INODE_COST + extra
        if stat.S_ISDIR(mode):
            cost += DIR_OBJECT_COST + EMPTY_DIRECTORY_FOOTPRINT
        self.budget.reserve(cost, headroom + dict_growth(self._inodes, self._inodes_appended))
        ino = self._next_ino
        self._next_ino += 1
        node = Inode(ino, mode, uid, gid, now_ns())
        self._inodes[ino] = node
        self._inodes_appended = appended_after(self._inodes, self._inodes_charged, self._inodes_appended)
        self._settle_table()
        return node

    def _settle_table(self) -> None:
        """Charge (or give back) what the inode table's own size changed by."""
        size = sys.getsizeof(self._inodes)
        if size != self._inodes_charged:
            self.budget.adjust(size - self._inodes_charged)
            self._inodes_charged = size

    def __len__(self) -> int:
        return len(self._inodes)

    def get(self, ino: int) -> Inode:
        """The inode *ino*; ENOENT if it does not exist (any more)."""
        node = self._inodes.get(ino)
        if node is None:
            raise FsError(errno.ENOENT)
        return node

    def all_inodes(self) -> list[Inode]:
        """Every inode (for teardown)."""
        return list(self._inodes.values())

    def directory(self, ino: int) -> tuple[Inode, Directory]:
        """The inode *ino* as a directory; ENOTDIR otherwise."""
        node = self.get(ino)
        if node.directory is None:
            raise FsError(errno.ENOTDIR)
        return node, node.directory

    def lookup(self, parent: int, name: bytes) -> Inode:
        """Resolve *name* in *parent* (no lookup-count change)."""
        if len(name) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        pnode, d = self.directory(parent)
        if name == b".":
            return pnode
        if name == b"..":
            return self.get(pnode.name_hint[0] or ROOT_INO)
        ino = d.get(name)
        if ino is None:
            raise FsError(errno.ENOENT)
        return self._inodes[ino]

    def path_of(self, node: Inode) -> str:
        """A best-effort path of *node* inside the mount, for log lines."""
        parts: list[bytes] = []
        seen = 0
        cur = node
        while cur.ino != ROOT_INO and seen < 256:
            parent, name = cur.name_hint
            if not parent:
                return "<unlinked>/" + b"/".join(reversed(parts)).decode(errors="replace")
            parts.append(name)
            nxt = self._inodes.get(parent)
            if nxt is None:
                break
            cur = nxt
            seen += 1
        return "/" + b"/".join(reversed(parts)).decode(errors="replace")

    # --- creation ------------------------------------------------------------------------------
    def create(self, parent: int, name: bytes, mode: int, uid: int, gid: int, target: bytes | None = None) -> Inode:
        """Create a file, directory, symlink or special node *name* in *parent*."""
        check_name(name)
        pnode, d = self.directory(parent)
        if d.get(name) is not None:
            raise FsError(errno.EEXIST)
        if target is not None and len(target) >= PATH_MAX:
            raise FsError(errno.ENAMETOOLONG)
        if pnode.mode & stat.S_ISGID:
            gid = pnode.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        extra = ENTRY_COST + bytes_cost(len(name)) + (bytes_cost(len(target)) if target is not None else 0)
        dir_size = d.footprint()
        node = self._new(mode, uid, gid, extra, d.growth())
        node.target = target
        node.nlink = 2 if node.is_dir else 1
        if node.is_dir:
            pnode.nlink += 1
        d.add(name, node.ino)
        self.budget.adjust(d.footprint() - dir_size)
        node.name_hint = (parent, name)
        self._touch_dir(pnode)
        return node

    def link(self, ino: int, new_parent: int, new_name: bytes) -> Inode:
        """Add a hard link to a non-directory."""
        check_name(new_name)
        node = self.get(ino)
        if node.is_dir:
            raise FsError(errno.EPERM)
        pnode, d = self.directory(new_parent)
        if d.get(new_name) is not None:
            raise FsError(errno.EEXIST)
        if node.nlink == 0:
            raise FsError(errno.ENOENT)
        self.budget.reserve(ENTRY_COST + bytes_cost(len(new_name)), d.growth())
        dir_size = d.footprint()
        d.add(new_name, node.ino)
        self.budget.adjust(d.footprint() - dir_size)
        node.nlink += 1
        node.ctime_ns = now_ns()
        if node.name_hint[0] == 0:
            node.name_hint = (new_parent, new_name)
        self._touch_dir(pnode)
        return node

    # --- removal -------------------------------------------------------------------------------
    def unlink(self, parent: int, name: bytes) -> Inode:
        """Remove a non-directory name; returns the inode (maybe now nameless)."""
        pnode, d = self.directory(parent)
        node = self.lookup(parent, name)
        if node.is_dir:
            raise FsError(errno.EISDIR)
        self._remove_entry(d, name)
        self._drop_name(node, parent, name)
        self._touch_dir(pnode)
        return node

    def rmdir(self, parent: int, name: bytes) -> Inode:
        """Remove an empty directory."""
        if name == b".":
            raise FsError(errno.EINVAL)
        if name == b"..":
            raise FsError(errno.ENOTEMPTY)
        pnode, d = self.directory(parent)
        node = self.lookup(parent, name)
        if node.directory is None:
            raise FsError(errno.ENOTDIR)
        if len(node.directory):
            raise FsError(errno.ENOTEMPTY)
        self._remove_entry(d, name)
        node.nlink = 0
        self._make_nameless(node, name)
        node.ctime_ns = now_ns()
        pnode.nlink -= 1
        self._touch_dir(pnode)
        return node

    def _remove_entry(self, d: Directory, name: bytes) -> None:
        """Remove *name* from *d* and give back what it cost (its containers may shrink)."""
        dir_size = d.footprint()
        d.remove(name)
        self.budget.adjust(d.footprint() - dir_size - ENTRY_COST - bytes_cost(len(name)))

    def _drop_name(self, node: Inode, parent: int, name: bytes) -> None:
        node.nlink -= 1
        node.ctime_ns = now_ns()
        if node.name_hint == (parent, name):
            if node.nlink:
                node.name_hint = self._find_other_name(node)
            else:
                self._make_nameless(node, name)

    def _make_nameless(self, node: Inode, name: bytes) -> None:
        """*node* lost its last name; it keeps *name* for log lines while open, charged until released."""
        node.name_hint = (0, name)
        self.budget.adjust(bytes_cost(len(name)))

    def _find_other_name(self, node: Inode) -> tuple[int, bytes]:
        # Only used for log paths after a hard link's primary name goes; a bounded search.
        for other in list(self._inodes.values())[:10000]:
            if other.directory is not None:
                for n in other.directory.names():
                    if other.directory.get(n) == node.ino:
                        return (other.ino, n)
        return (0, b"")

    # --- rename --------------------------------------------------------------------------------
    def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int) -> Inode | None:
        """rename(2)/renameat2(2). Returns an inode that lost its last name (to be released), if any."""
        check_name(new_name)
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == (RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise FsError(errno.EINVAL)
        op_node, od = self.directory(old_parent)
        np_node, nd = self.directory(new_parent)
        node = self.lookup(old_parent, old_name)
        if old_name in (b".", b".."):
            raise FsError(errno.EINVAL)
        target_ino = nd.get(new_name)
        target = self._inodes[target_ino] if target_ino is not None else None

        if flags & RENAME_EXCHANGE:
            if target is None:
                raise FsError(errno.ENOENT)
            if node is target:
                return None
            if node.is_dir:
                self._check_not_ancestor(node, new_parent)
            if target.is_dir:
                self._check_not_ancestor(target, old_parent)
            od.replace(old_name, target.ino)
            nd.replace(new_name, node.ino)
            if node.is_dir != target.is_dir and old_parent != new_parent:
                delta = 1 if node.is_dir else -1
                op_node.nlink -= delta
                np_node.nlink += delta
            self._rehint(node, (old_parent, old_name), (new_parent, new_name))
            self._rehint(target, (new_parent, new_name), (old_parent, old_name))
            t = now_ns()
            node.ctime_ns = target.ctime_ns = t
            self._touch_dir(op_node, t)
            self._touch_dir(np_node, t)
            return None

        if target is not None and flags & RENAME_NOREPLACE:
            raise FsError(errno.EEXIST)
        if target is node:
            return None  # POSIX: renaming a name onto another link of the same inode does nothing
        if node.is_dir:
            self._check_not_ancestor(node, new_parent)
        released: Inode | None = None
        if target is not None:
            if target.directory is not None:
                if not node.is_dir:
                    raise FsError(errno.EISDIR)
                if len(target.directory):
                    raise FsError(errno.ENOTEMPTY)
            elif node.is_dir:
                raise FsError(errno.ENOTDIR)
        # The new name's bytes (the old name's and a replaced entry's are given back below), and
        # room for the new directory's containers to grow.
        self.budget.reserve(bytes_cost(len(new_name)), nd.growth())
        dirs_size = od.footprint() + (nd.footprint() if nd is not od else 0)
        freed = bytes_cost(len(old_name))
        if target is not None:
            freed += ENTRY_COST + bytes_cost(len(new_name))
            nd.remove(new_name)
            if target.directory is not None:
                target.nlink = 0
                np_node.nlink -= 1
                self._make_nameless(target, new_name)
                target.ctime_ns = now_ns()
            else:
                self._drop_name(target, new_parent, new_name)
            released = target
        od.remove(old_name)
        nd.add(new_name, node.ino)
        self.budget.adjust(od.footprint() + (nd.footprint() if nd is not od else 0) - dirs_size - freed)
        if node.is_dir and old_parent != new_parent:
            op_node.nlink -= 1
            np_node.nlink += 1
        self._rehint(node, (old_parent, old_name), (new_parent, new_name))
        t = now_ns()
        node.ctime_ns = t
        self._touch_dir(op_node, t)
        self._touch_dir(np_node, t)
        return released

    def _rehint(self, node: Inode, old: tuple[int, bytes], new: tuple[int, bytes]) -> None:
        if node.name_hint == old or node.is_dir or node.name_hint[0] == 0:
            node.name_hint = new

    def _check_not_ancestor(self, node: Inode, new_parent: int) -> None:
        """EINVAL if moving directory *node* under *new_parent* would make it its own ancestor."""
        cur = new_parent
        for _ in range(100000):
            if cur == node.ino:
                raise FsError(errno.EINVAL)
            if cur == ROOT_INO:
                return
            cur = self.get(cur).name_hint[0] or ROOT_INO

    # --- reference counting --------------------------------------------------------------------
    def remember(self, node: Inode) -> None:
        """The kernel learned about *node* (lookup, create, readdirplus entry)."""
        node.lookups += 1

    def forget(self, ino: int, count: int) -> Inode | None:
        """The kernel dropped *count* references; returns the inode if it is now unused."""
        node = self._inodes.get(ino)
        if node is None:
            return None
        node.lookups = max(0, node.lookups - count)
        return self.release_if_unused(node)

    def release_if_unused(self, node: Inode) -> Inode | None:
        """Drop *node* from the table if nothing refers to it any more; returns it if dropped."""
        if node.ino != ROOT_INO and node.nlink == 0 and node.lookups == 0 and node.opens == 0:
            if self._inodes.pop(node.ino, None) is not None:
                self.budget.adjust(-self._inode_cost(node))
                node.xattrs = None
                self._settle_table()  # a dict never shrinks on removal; kept for other interpreters
            return node
        return None

    @staticmethod
    def _inode_cost(node: Inode) -> int:
        """What _new, create and setxattr charged for *node* itself (names are given back as they go)."""
        cost = INODE_COST
        parent, name = node.name_hint
        if not parent and name:
            cost += bytes_cost(len(name))  # kept by _make_nameless
        if node.target is not None:
            cost += bytes_cost(len(node.target))
        if node.directory is not None:
            cost += DIR_OBJECT_COST + node.directory.footprint()
        if node.xattrs is not None:
            cost += _xattrs_cost(node.xattrs)
        return cost

    # --- xattrs --------------------------------------------------------------------------------
    def setxattr(self, node: Inode, name: bytes, value: bytes) -> None:
        """Set an xattr; ENOSPC past the per-inode count/bytes limits or the memory budget."""
        xattrs = node.xattrs
        old = xattrs.get(name) if xattrs else None
        if old is None:
            if xattrs and len(xattrs) >= self.limits.max_xattrs:
                raise self.budget.refuse("xattrs_per_inode")
            delta = bytes_cost(len(name)) + bytes_cost(len(value))
            grow = len(name) + len(value)
            # its dict (<= max_xattrs entries, a few KiB): made now, or grown by up to double
            headroom = sys.getsizeof(xattrs) if xattrs is not None else EMPTY_XATTRS_GROWTH
        else:
            delta = bytes_cost(len(value)) - bytes_cost(len(old))
            grow = len(value) - len(old)
            headroom = 0
        # bounded by max_xattrs, so this sum is at most 128 short steps
        total = sum(len(k) + len(v) for k, v in xattrs.items()) if xattrs else 0
        if total + grow > self.limits.max_xattr_bytes:
            raise self.budget.refuse("xattr_bytes_per_inode")
        if delta > 0:
            self.budget.reserve(delta, headroom)
        else:
            self.budget.adjust(delta)
        if xattrs is None:
            xattrs = node.xattrs = {}
            table_size = 0  # nothing charged for it yet
        else:
            table_size = sys.getsizeof(xattrs)
        xattrs[name] = bytes(value)
        self.budget.adjust(sys.getsizeof(xattrs) - table_size)
        node.ctime_ns = now_ns()

    def removexattr(self, node: Inode, name: bytes) -> None:
        """Remove an xattr; ENOATTR (ENODATA) if it is not set."""
        if not node.xattrs or name not in node.xattrs:
            raise FsError(errno.ENODATA)
        value = node.xattrs.pop(name)
        self.budget.adjust(-(bytes_cost(len(name)) + bytes_cost(len(value))))
        node.ctime_ns = now_ns()

    # --- helpers -------------------------------------------------------------------------------
    def _touch_dir(self, node: Inode, t: int | None = None) -> None:
        node.mtime_ns = node.ctime_ns = t if t is not None else now_ns()
