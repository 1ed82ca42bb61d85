"""passthrough: a minimal pyfuse3 passthrough, the cost of Python + FUSE + backing I/O.

Every operation is forwarded to the same path below the backing directory; no crypto, no
caching of our own. FUSE inode numbers are the backing files' inode numbers (the backing
directory's own inode is swapped with pyfuse3's ROOT_INODE). Each known inode maps to one
path; a directory rename rewrites the paths below it.

File I/O is ``os.pread``/``os.pwrite`` on the event-loop thread by default (on tmpfs that is
a memcpy, cheaper than a thread hop); ``--threads`` moves it to trio worker threads, which is
what a filesystem with real work per request (crypto) does.

Run: ``python -m tools.bench.passthrough BACKING MNT [--threads] [--max-tasks N]``.
"""

from __future__ import annotations

import argparse
import errno
import os
import stat
import sys
from collections.abc import Sequence

import pyfuse3
import trio
from pyfuse3 import FUSEError

from tools.bench.fusemain import build_parser, serve, setup_logging

PROG = "passthrough"


def _fuse_error(e: OSError) -> FUSEError:
    return FUSEError(e.errno or errno.EIO)


class Passthrough(pyfuse3.Operations):
    """Forward every request to the backing directory."""

    enable_writeback_cache = False

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        self.enable_writeback_cache = bool(args.writeback_cache)
        self.direct_io = bool(args.direct_io)
        self.attr_timeout = float(args.attr_timeout)
        self.threads = bool(args.threads)
        self.root = os.path.realpath(args.backing)
        self.root_st_ino = os.lstat(self.root).st_ino
        self.paths: dict[int, str] = {pyfuse3.ROOT_INODE: self.root}
        self.lookups: dict[int, int] = {pyfuse3.ROOT_INODE: 1}
        # Open file handle (backing fd) -> FUSE inode, for fstat of open-unlinked files.
        self.open_inodes: dict[int, int] = {}
        self.limiter = trio.CapacityLimiter(max(2, os.cpu_count() or 2))

    # -- inode bookkeeping ---------------------------------------------------------------
    def _ino(self, st_ino: int) -> int:
        # A bijection: the backing root becomes ROOT_INODE and whatever has ROOT_INODE's
        # number in the backing store takes the root's.
        if st_ino == self.root_st_ino:
            return pyfuse3.ROOT_INODE
        if st_ino == pyfuse3.ROOT_INODE:
            return self.root_st_ino
        return st_ino

    def _path(self, ino: int) -> str:
        try:
            return self.paths[ino]
        except KeyError:
            raise FUSEError(errno.ENOENT) from None

    def _child(self, parent: int, name: bytes) -> str:
        return os.path.join(self._path(parent), os.fsdecode(name))

    def _remember(self, path: str, st: os.stat_result) -> pyfuse3.EntryAttributes:
        """Count a lookup of *path* and return its attributes."""
        ino = self._ino(st.st_ino)
        self.paths[ino] = path
        self.lookups[ino] = self.lookups.get(ino, 0) + 1
        return self._attr(ino, st)

    def _attr(self, ino: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.st_mode = st.st_mode
        a.st_nlink = st.st_nlink
        a.st_uid = st.st_uid
        a.st_gid = st.st_gid
        a.st_rdev = st.st_rdev
        a.st_size = st.st_size
        a.st_blksize = st.st_blksize
        a.st_blocks = st.st_blocks
        a.st_atime_ns = st.st_atime_ns
        a.st_mtime_ns = st.st_mtime_ns
        a.st_ctime_ns = st.st_ctime_ns
        a.attr_timeout = self.attr_timeout
        a.entry_timeout = self.attr_timeout
        return a

    def _stat_ino(self, ino: int) -> os.stat_result:
        try:
            return os.lstat(self._path(ino))
        except OSError as e:
            # An open-unlinked file has no path any more; its open fd still answers.
            for fd, fino in self.open_inodes.items():
                if fino == ino:
                    return os.fstat(fd)
            raise _fuse_error(e) from None

    # -- namespace -----------------------------------------------------------------------
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        try:
            st = os.lstat(path)
        except OSError as e:
            raise _fuse_error(e) from None
        return self._remember(os.path.normpath(path), st)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            left = self.lookups.get(ino, 0) - count
            if left > 0:
                self.lookups[ino] = left
            elif ino != pyfuse3.ROOT_INODE:
                self.lookups.pop(ino, None)
                self.paths.pop(ino, None)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(inode, self._stat_ino(inode))

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        target: int | str = fh if fh is not None else self._path(inode)
        try:
            if fields.update_size:
                os.truncate(target, attr.st_size)
            if fields.update_mode:
                if isinstance(target, int):
                    os.fchmod(target, stat.S_IMODE(attr.st_mode))
                elif not stat.S_ISLNK(os.lstat(target).st_mode):
                    os.chmod(target, stat.S_IMODE(attr.st_mode))
            if fields.update_uid or fields.update_gid:
                uid = attr.st_uid if fields.update_uid else -1
                gid = attr.st_gid if fields.update_gid else -1
                if isinstance(target, int):
                    os.fchown(target, uid, gid)
                else:
                    os.lchown(target, uid, gid)
            if fields.update_atime or fields.update_mtime:
                st = os.fstat(target) if isinstance(target, int) else os.lstat(target)
                atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
                mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
                if isinstance(target, int):
                    os.utime(target, ns=(atime, mtime))
                else:
                    os.utime(target, ns=(atime, mtime), follow_symlinks=False)
            st = os.fstat(target) if isinstance(target, int) else os.lstat(target)
        except OSError as e:
            raise _fuse_error(e) from None
        return self._attr(inode, st)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        try:
            os.mkdir(path, mode & ~ctx.umask)
            st = os.lstat(path)
        except OSError as e:
            raise _fuse_error(e) from None
        return self._remember(path, st)

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        try:
            os.mknod(path, mode & ~ctx.umask, rdev)
            st = os.lstat(path)
        except OSError as e:
            raise _fuse_error(e) from None
        return self._remember(path, st)

    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        try:
            os.symlink(os.fsdecode(target), path)
            st = os.lstat(path)
        except OSError as e:
            raise _fuse_error(e) from None
        return self._remember(path, st)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        try:
            return os.fsencode(os.readlink(self._path(inode)))
        except OSError as e:
            raise _fuse_error(e) from None

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = self._child(new_parent_inode, new_name)
        try:
            os.link(self._path(inode), path, follow_symlinks=False)
            st = os.lstat(path)
        except OSError as e:
            raise _fuse_error(e) from None
        # The inode keeps its first path: both name the same file.
        self.lookups[inode] = self.lookups.get(inode, 0) + 1
        return self._attr(inode, st)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        path = self._child(parent_inode, name)
        try:
            os.unlink(path)
        except OSError as e:
            raise _fuse_error(e) from None

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        path = self._child(parent_inode, name)
        try:
            os.rmdir(path)
        except OSError as e:
            raise _fuse_error(e) from None

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        if flags:
            # RENAME_NOREPLACE / RENAME_EXCHANGE are not needed by any benchmark.
            raise FUSEError(errno.EINVAL)
        old = self._child(parent_inode_old, name_old)
        new = self._child(parent_inode_new, name_new)
        try:
            st = os.lstat(old)
            os.rename(old, new)
        except OSError as e:
            raise _fuse_error(e) from None
        ino = self._ino(st.st_ino)
        if ino in self.paths:
            self.paths[ino] = new
        if stat.S_ISDIR(st.st_mode):
            prefix = old + os.sep
            for other, p in list(self.paths.items()):
                if p.startswith(prefix):
                    self.paths[other] = new + p[len(old):]

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # Entries sorted by inode number: a stable order, so next_id (= inode) resumes
        # correctly even if the directory changed between two calls.
        path = self._path(fh)
        try:
            with os.scandir(path) as it:
                entries = sorted(
                    (self._ino(e.inode()), e.name) for e in it
                )
        except OSError as e:
            raise _fuse_error(e) from None
        for ino, name in entries:
            if ino <= start_id:
                continue
            try:
                st = os.lstat(os.path.join(path, name))
            except FileNotFoundError:
                continue
            except OSError as e:
                raise _fuse_error(e) from None
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attr(ino, st), ino):
                break
            # pyfuse3 answers with READDIRPLUS: the kernel now holds a lookup of the entry.
            self.paths[ino] = os.path.join(path, name)
            self.lookups[ino] = self.lookups.get(ino, 0) + 1

    async def releasedir(self, fh: int) -> None:
        return None

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sv = os.statvfs(self.root)
        s = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                      "f_ffree", "f_favail", "f_namemax"):
            setattr(s, field, getattr(sv, field))
        return s

    # -- files ---------------------------------------------------------------------------
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        # O_DIRECT is the kernel's business (FUSE already bypassed the page cache for it);
        # the backing file is opened without it. O_APPEND would fight the offsets FUSE gives.
        flags &= ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_DIRECT | os.O_APPEND)
        try:
            fd = os.open(self._path(inode), flags)
        except OSError as e:
            raise _fuse_error(e) from None
        self.open_inodes[fd] = inode
        return pyfuse3.FileInfo(fh=fd, direct_io=self.direct_io)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo,
                                                           pyfuse3.EntryAttributes]:
        path = self._child(parent_inode, name)
        flags &= ~(os.O_NOCTTY | os.O_DIRECT | os.O_APPEND)
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_TRUNC, mode & ~ctx.umask)
            st = os.fstat(fd)
        except OSError as e:
            raise _fuse_error(e) from None
        attr = self._remember(path, st)
        self.open_inodes[fd] = attr.st_ino
        return pyfuse3.FileInfo(fh=fd, direct_io=self.direct_io), attr

    async def read(self, fh: int, off: int, size: int) -> bytes:
        try:
            if self.threads:
                return await trio.to_thread.run_sync(os.pread, fh, size, off,
                                                     limiter=self.limiter)
            return os.pread(fh, size, off)
        except OSError as e:
            raise _fuse_error(e) from None

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        try:
            if self.threads:
                return await trio.to_thread.run_sync(os.pwrite, fh, buf, off,
                                                     limiter=self.limiter)
            return os.pwrite(fh, buf, off)
        except OSError as e:
            raise _fuse_error(e) from None

    async def flush(self, fh: int) -> None:
        return None

    async def fsync(self, fh: int, datasync: bool) -> None:
        try:
            if datasync:
                os.fdatasync(fh)
            else:
                os.fsync(fh)
        except OSError as e:
            raise _fuse_error(e) from None

    async def release(self, fh: int) -> None:
        self.open_inodes.pop(fh, None)
        try:
            os.close(fh)
        except OSError as e:
            raise _fuse_error(e) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``python -m tools.bench.passthrough BACKING MNT``."""
    parser = build_parser(PROG, "minimal pyfuse3 passthrough (benchmark baseline)")
    parser.add_argument(
        "--threads", action="store_true",
        help="do file I/O in trio worker threads instead of on the event-loop thread",
    )
    args = parser.parse_args(argv)
    setup_logging(args.log_file, args.debug)
    for what, path in (("backing directory", args.backing), ("mount point", args.mountpoint)):
        if not os.path.isdir(path):
            print(f"{PROG}: {what} {path} does not exist; create it first", file=sys.stderr)
            return 2
    return serve(Passthrough(args), args, fsname=PROG, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
