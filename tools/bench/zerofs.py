"""zerofs: the zero-work pyfuse3 filesystem, the floor cost of pyfuse3 itself.

File contents are never stored: writes are discarded (only the file size is kept) and reads
return zeros. The namespace (directories, names, modes, times, sizes, symlinks, hard links)
is a small in-memory table, so that every benchmark runs over it: streaming, fio, and the
small-file tree (tar extract, ``ls -lR``, ``rm -rf``). Whatever any real filesystem built on
pyfuse3 does per request, this one does less; its throughput is the physical limit of the
stack (kernel FUSE + libfuse + pyfuse3 + trio + one Python handler call).

The backing directory is accepted for a uniform command line and never touched.

Run: ``python -m tools.bench.zerofs BACKING MNT [--max-tasks N] [--writeback-cache]``.
"""

from __future__ import annotations

import argparse
import errno
import itertools
import os
import stat
import sys
import time
from collections.abc import Sequence

import pyfuse3
from pyfuse3 import FUSEError

from tools.bench.fusemain import run_main

PROG = "zerofs"
BLOCK = 4096


class Node:
    """One inode. Directory entries live in *children* (name -> inode number)."""

    __slots__ = ("atime", "children", "ctime", "gid", "lookups", "mode", "mtime", "nlink",
                 "opens", "parent", "size", "target", "uid")

    def __init__(self, mode: int, uid: int, gid: int, target: bytes = b"") -> None:
        now = time.time_ns()
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.size = len(target)
        self.nlink = 2 if stat.S_ISDIR(mode) else 1
        self.atime = self.mtime = self.ctime = now
        self.children: dict[bytes, int] | None = {} if stat.S_ISDIR(mode) else None
        self.target = target
        self.lookups = 0
        self.opens = 0
        # The directory holding this node (for ".."; a hard-linked file keeps its first one).
        self.parent = pyfuse3.ROOT_INODE


class ZeroFS(pyfuse3.Operations):
    """Zero-work operations: every handler does the least a correct filesystem can do."""

    enable_writeback_cache = False

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        self.enable_writeback_cache = bool(args.writeback_cache)
        self.direct_io = bool(args.direct_io)
        self.attr_timeout = float(args.attr_timeout)
        self.nodes: dict[int, Node] = {
            pyfuse3.ROOT_INODE: Node(stat.S_IFDIR | 0o755, os.getuid(), os.getgid())
        }
        self.nodes[pyfuse3.ROOT_INODE].lookups = 1
        self.next_ino = itertools.count(pyfuse3.ROOT_INODE + 1)
        # Handles are inode numbers: a read needs nothing else.
        self.zeros: dict[int, bytes] = {}

    # -- helpers -------------------------------------------------------------------------
    def _node(self, ino: int) -> Node:
        try:
            return self.nodes[ino]
        except KeyError:
            raise FUSEError(errno.ENOENT) from None

    def _dir(self, ino: int) -> dict[bytes, int]:
        children = self._node(ino).children
        if children is None:
            raise FUSEError(errno.ENOTDIR)
        return children

    def _attr(self, ino: int, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.st_mode = node.mode
        a.st_nlink = node.nlink
        a.st_uid = node.uid
        a.st_gid = node.gid
        a.st_size = node.size
        a.st_blksize = BLOCK
        a.st_blocks = (node.size + 511) // 512
        a.st_atime_ns = node.atime
        a.st_mtime_ns = node.mtime
        a.st_ctime_ns = node.ctime
        # Same cache lifetimes as gocryptfs (1 s), so that both pay for metadata alike.
        a.attr_timeout = self.attr_timeout
        a.entry_timeout = self.attr_timeout
        return a

    def _maybe_free(self, ino: int) -> None:
        node = self.nodes.get(ino)
        if node is not None and node.nlink <= 0 and node.lookups <= 0 and node.opens <= 0:
            del self.nodes[ino]

    def _new(self, parent: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext,
             target: bytes = b"") -> tuple[int, Node]:
        children = self._dir(parent)
        if name in children:
            raise FUSEError(errno.EEXIST)
        ino = next(self.next_ino)
        node = Node(mode, ctx.uid, ctx.gid, target)
        node.lookups = 1
        node.parent = parent
        self.nodes[ino] = node
        children[name] = ino
        parent_node = self.nodes[parent]
        if stat.S_ISDIR(mode):
            parent_node.nlink += 1
        parent_node.mtime = parent_node.ctime = node.ctime
        return ino, node

    # -- namespace -----------------------------------------------------------------------
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if name == b".":
            ino = parent_inode
        elif name == b"..":
            ino = self._parent_of(parent_inode)
        else:
            ino = self._dir(parent_inode).get(name, 0)
            if not ino:
                raise FUSEError(errno.ENOENT)
        node = self._node(ino)
        node.lookups += 1
        return self._attr(ino, node)

    def _parent_of(self, ino: int) -> int:
        return self._node(ino).parent

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            node = self.nodes.get(ino)
            if node is not None:
                node.lookups -= count
                self._maybe_free(ino)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(inode, self._node(inode))

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        now = time.time_ns()
        if fields.update_size:
            node.size = attr.st_size
            node.mtime = now
        if fields.update_mode:
            node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            node.uid = attr.st_uid
        if fields.update_gid:
            node.gid = attr.st_gid
        if fields.update_atime:
            node.atime = attr.st_atime_ns
        if fields.update_mtime:
            node.mtime = attr.st_mtime_ns
        node.ctime = now
        return self._attr(inode, node)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        ino, node = self._new(parent_inode, name, stat.S_IFDIR | stat.S_IMODE(mode), ctx)
        return self._attr(ino, node)

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        ino, node = self._new(parent_inode, name, mode, ctx)
        return self._attr(ino, node)

    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        ino, node = self._new(parent_inode, name, stat.S_IFLNK | 0o777, ctx, target)
        return self._attr(ino, node)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self._node(inode).target

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        children = self._dir(new_parent_inode)
        if new_name in children:
            raise FUSEError(errno.EEXIST)
        children[new_name] = inode
        node.nlink += 1
        node.lookups += 1
        node.ctime = time.time_ns()
        return self._attr(inode, node)

    def _remove(self, parent_inode: int, name: bytes, want_dir: bool) -> None:
        children = self._dir(parent_inode)
        ino = children.get(name)
        if ino is None:
            raise FUSEError(errno.ENOENT)
        node = self.nodes[ino]
        if want_dir:
            if node.children is None:
                raise FUSEError(errno.ENOTDIR)
            if node.children:
                raise FUSEError(errno.ENOTEMPTY)
            node.nlink = 0
            self.nodes[parent_inode].nlink -= 1
        else:
            if node.children is not None:
                raise FUSEError(errno.EISDIR)
            node.nlink -= 1
        del children[name]
        parent = self.nodes[parent_inode]
        parent.mtime = parent.ctime = node.ctime = time.time_ns()
        self._maybe_free(ino)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._remove(parent_inode, name, want_dir=False)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._remove(parent_inode, name, want_dir=True)

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        if flags & ~pyfuse3.RENAME_NOREPLACE:
            raise FUSEError(errno.EINVAL)
        old_dir = self._dir(parent_inode_old)
        new_dir = self._dir(parent_inode_new)
        ino = old_dir.get(name_old)
        if ino is None:
            raise FUSEError(errno.ENOENT)
        if name_new in new_dir:
            if flags & pyfuse3.RENAME_NOREPLACE:
                raise FUSEError(errno.EEXIST)
            victim = self.nodes[new_dir[name_new]]
            if victim.children:
                raise FUSEError(errno.ENOTEMPTY)
            self._remove(parent_inode_new, name_new, want_dir=victim.children is not None)
        del old_dir[name_old]
        new_dir[name_new] = ino
        self.nodes[ino].parent = parent_inode_new
        if self.nodes[ino].children is not None and parent_inode_old != parent_inode_new:
            self.nodes[parent_inode_old].nlink -= 1
            self.nodes[parent_inode_new].nlink += 1

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self._dir(inode)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # "." and ".." come first (ids 1, 2), then the entries sorted by inode number with
        # id = inode + 2: a stable order, so that entries added or removed between two calls
        # (rm -rf deletes while listing) never make others skipped or repeated.
        children = self._dir(fh)
        if start_id == 0:
            if not pyfuse3.readdir_reply(token, b".", self._attr(fh, self.nodes[fh]), 1):
                return
            start_id = 1
        if start_id == 1:
            parent = self.nodes[fh].parent
            if not pyfuse3.readdir_reply(token, b"..", self._attr(parent, self.nodes[parent]), 2):
                return
            start_id = 2
        for ino, name in sorted((i, n) for n, i in children.items() if i + 2 > start_id):
            pos = ino + 2
            node = self.nodes[ino]
            if not pyfuse3.readdir_reply(token, name, self._attr(ino, node), pos):
                break
            # pyfuse3 answers with READDIRPLUS: the kernel now holds a lookup of the entry
            # ("." and ".." above are the exception and are not counted).
            node.lookups += 1

    async def releasedir(self, fh: int) -> None:
        return None

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = BLOCK
        s.f_blocks = s.f_bfree = s.f_bavail = 1 << 30
        s.f_files = s.f_ffree = s.f_favail = 1 << 30
        s.f_namemax = 255
        return s

    # -- files ---------------------------------------------------------------------------
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if flags & os.O_TRUNC:
            node.size = 0
        node.opens += 1
        return pyfuse3.FileInfo(fh=inode, direct_io=self.direct_io)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo,
                                                           pyfuse3.EntryAttributes]:
        ino, node = self._new(parent_inode, name, stat.S_IFREG | stat.S_IMODE(mode), ctx)
        node.opens += 1
        return pyfuse3.FileInfo(fh=ino, direct_io=self.direct_io), self._attr(ino, node)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        node = self.nodes[fh]
        n = max(0, min(size, node.size - off))
        # One preallocated zero buffer per request size: reads cost no allocation.
        buf = self.zeros.get(n)
        if buf is None:
            buf = self.zeros[n] = bytes(n)
        return buf

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        node = self.nodes[fh]
        end = off + len(buf)
        if end > node.size:
            node.size = end
        return len(buf)

    async def flush(self, fh: int) -> None:
        return None

    async def fsync(self, fh: int, datasync: bool) -> None:
        return None

    async def release(self, fh: int) -> None:
        node = self.nodes.get(fh)
        if node is not None:
            node.opens -= 1
            self._maybe_free(fh)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``python -m tools.bench.zerofs BACKING MNT``."""
    return run_main(argv, PROG, __doc__.splitlines()[0] if __doc__ else PROG, ZeroFS)


if __name__ == "__main__":
    sys.exit(main())
