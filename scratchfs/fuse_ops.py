"""FUSE operations: translation between pyfuse3 requests and the namespace/content engines.

This is the only module that knows FUSE exists. Every handler is wrapped so that our own
exceptions become errno replies exactly once: FsError -> its errno, IntegrityError -> EIO with
one WARNING line naming the file (the open-file table stamps its inode) and block, OSError
from the backing store -> its errno (ENOSPC, EDQUOT, EFBIG pass through; anything else becomes
EIO), and any other exception -> EIO with an ERROR line (which fails strict-mode tests).

Why one module of some 650 lines: pyfuse3 dispatches every request to a method of one
`Operations` subclass, and each method here is translation only (the work lives in `tree`,
`content`, `openfiles`, `store`, `limits`). Splitting the class into mixins would spread the
one table of "which request answers which errno" that this module exists to keep in view.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
from collections.abc import Callable, Coroutine, Sequence
from contextlib import AbstractAsyncContextManager as AsyncContextManager
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

import pyfuse3
import trio

from scratchfs import fallocate as falloc
from scratchfs.content import FileContent
from scratchfs.errors import FsError, IntegrityError
from scratchfs.limits import ENGINE_COST, HANDLE_COST, Limits, owner_request
from scratchfs.openfiles import OpenFileTable
from scratchfs.stats import RequestStats
from scratchfs.store import BlobStore
from scratchfs.tree import (
    ROOT_INO,
    XATTR_NAME_MAX,
    XATTR_SIZE_MAX,
    Inode,
    Namespace,
    now_ns,
)

log = logging.getLogger("scratchfs.fuse")

P = ParamSpec("P")
R = TypeVar("R")

# Reads and writes run their crypto and blob I/O on the trio thread, whatever their size.
# `cryptography`'s AEAD holds the GIL while it works (its Rust binding never detaches), so a
# worker thread cannot decrypt beside the trio thread; it only added a hop (~230-400 µs of CPU:
# wakeup socket, epoll, run_sync_soon) and GIL hand-offs between the two. Measured with the
# scratch profile, 1 GiB over tmpfs, 3 alternating runs (docs/bench.md): cold streaming read
# 587/537/607 MiB/s with 1 MiB requests on threads, 1048/830/781 inline; daemon CPU per MiB
# 1.7-2.0 ms vs 0.9-1.25 ms; writes within noise. Long waits still go to threads: fsync and a
# large fallocate (the backing store may take seconds), bounded by _limiter. The cost: a large
# request on a slow backing store holds up the others for its I/O, as small ones always did;
# over the agent's userspace volume (docs/bench.md) streaming measured no slower for it.
PASS_THROUGH_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EMFILE, errno.ENFILE}
DAY_NS = 86400 * 10**9
# Read-only virtual xattrs `scratchfs verify` asks for (never listed, never stored; setting a
# name under this prefix is refused): the block size, and the byte ranges a check must read.
VIRTUAL_XATTR_PREFIX = b"user.scratchfs."
CHECK_RANGES_XATTR = VIRTUAL_XATTR_PREFIX + b"check_ranges."
CHECK_RANGES_PER_REPLY = 1024  # ~40 KiB of text: under the 64 KiB xattr size limit


def _redact(name: str, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Arguments safe to log: file contents, xattr values and link targets become their length."""
    out = list(args)
    # write: data; setxattr: value; symlink: target (link targets are content, not names)
    if name in ("write", "setxattr", "symlink") and len(out) >= 3:
        out[2] = f"<{len(out[2])} bytes>"
    return tuple(a for a in out if not isinstance(a, pyfuse3.RequestContext | pyfuse3.ReaddirToken))


def handler(fn: Callable[Concatenate[ScratchOps, P], Coroutine[Any, Any, R]]) -> Callable[
    Concatenate[ScratchOps, P], Coroutine[Any, Any, R]
]:
    """Wrap a FUSE handler: count it, debug log, and translate exceptions to errno replies once."""
    name = fn.__name__

    async def wrapper(self: ScratchOps, /, *args: P.args, **kwargs: P.kwargs) -> R:
        self.stats.counts[name] += 1
        # Who may spend the owner's reserve (limits.py); requests without a context: see write.
        owner_request.set(bool(args) and isinstance(args[-1], pyfuse3.RequestContext) and args[-1].uid in self.owners)
        if self.debug:
            log.debug("op=%s args=%r", name, _redact(name, tuple(args)))
        try:
            return await fn(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except FsError as e:
            if self.debug:
                log.debug("op=%s errno=%s", name, errno.errorcode.get(e.errno, e.errno))
            raise pyfuse3.FUSEError(e.errno) from None
        except IntegrityError as e:
            self._log_integrity(e)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except OSError as e:
            code = e.errno if e.errno in PASS_THROUGH_ERRNOS else errno.EIO
            if code == errno.EIO:
                log.warning("event=backing_io_error op=%s errno=%s", name, errno.errorcode.get(e.errno or 0, e.errno))
            raise pyfuse3.FUSEError(code) from None
        except Exception:
            log.exception("event=internal_error op=%s", name)
            if self.strict:
                self.internal_errors += 1
            raise pyfuse3.FUSEError(errno.EIO) from None

    wrapper.__name__ = wrapper.__qualname__ = name  # as pyfuse3 and tracebacks know the handler
    return wrapper


class ScratchOps(pyfuse3.Operations):
    """The scratchfs FUSE filesystem."""

    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(
        self,
        store: BlobStore,
        block_size: int,
        *,
        debug: bool = False,
        strict: bool = False,
        attr_timeout: float = 1.0,
        root_uid: int | None = None,
        root_gid: int | None = None,
        limits: Limits | None = None,
        stats: RequestStats | None = None,
        no_xattr: bool = False,
    ) -> None:
        super().__init__()
        self.store = store
        self.mountpoint = Path("/")
        self.block_size = block_size
        self.debug = debug
        self.strict = strict
        self.internal_errors = 0
        self.attr_timeout = attr_timeout
        self.stats = stats if stats is not None else RequestStats()
        # no_xattr: every xattr request is answered ENOSYS, which the kernel remembers for the
        # whole connection (fs/fuse/xattr.c: fc->no_getxattr, no_listxattr, no_setxattr,
        # no_removexattr) and then answers EOPNOTSUPP itself. Above all this removes the
        # GETXATTR("security.capability") the kernel sends before every buffered write
        # (file_remove_privs), and the per-file xattr probes of `ls -l`.
        self.no_xattr = no_xattr
        # direct_io: every read and write reaches us, so each request is atomic under the
        # inode lock even against concurrent writers (the page cache copies bytes without a
        # lock and can mix two writes inside one page); costs shared mmap (ENODEV) and readahead.
        self.direct_io = False
        # keep_cache: every change to a file's content passes through this one kernel mount
        # (the blob store is ours alone, and writes, truncates and O_TRUNC opens update or
        # drop the kernel's pages themselves), so the page cache of a file cannot go stale
        # between opens; off, every open drops it and a file read after writing is decrypted
        # again. What is cached is plaintext that was authenticated (or written) by us, so
        # tampering of the blob is still detected by every read that reaches the daemon
        # (O_DIRECT, evicted pages), just not by reads the cache answers.
        self.keep_cache = False
        self.limits = limits if limits is not None else Limits()
        self.owners = frozenset({0, os.getuid()})  # the mount's owner and root may use the reserve
        self.ns = Namespace(
            root_uid=os.getuid() if root_uid is None else root_uid,
            root_gid=os.getgid() if root_gid is None else root_gid,
            limits=self.limits,
        )
        self.files = OpenFileTable()
        # Inodes whose cached writes the kernel could not hand us (past --max-file-size with the
        # writeback cache; FUSE cannot tell the kernel a size limit, so it took them into its page
        # cache and only learns at writeback). Reads past our size fail instead of showing the
        # kernel's zeros. Bounded by the inode table; cleared by truncate and inode release.
        self._lost_writes: set[int] = set()
        self._limiter = trio.CapacityLimiter(max(2, os.cpu_count() or 2))

    # --- helpers ---------------------------------------------------------------------------------
    def _attrs(self, node: Inode) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.generation = 0
        a.entry_timeout = self.attr_timeout
        a.attr_timeout = self.attr_timeout
        a.st_mode = node.mode
        a.st_nlink = node.nlink
        a.st_uid = node.uid
        a.st_gid = node.gid
        a.st_rdev = node.rdev
        content: FileContent | None = node.content
        if content is not None:
            a.st_size = content.size
            a.st_blocks = content.st_blocks
        elif node.directory is not None:
            a.st_size = (len(node.directory) + 2) * 20  # what tmpfs reports
            a.st_blocks = 0
        elif node.target is not None:
            a.st_size = len(node.target)
            a.st_blocks = 0
        else:
            a.st_size = 0
            a.st_blocks = 0
        a.st_blksize = self.block_size
        a.st_atime_ns = node.atime_ns
        a.st_mtime_ns = node.mtime_ns
        a.st_ctime_ns = node.ctime_ns
        return a

    def _content(self, node: Inode) -> FileContent:
        """The file's content engine, made on first use (empty files cost no engine, no blob)."""
        content: FileContent | None = node.content
        if content is None:
            if node.directory is not None:
                raise FsError(errno.EISDIR)
            if not stat.S_ISREG(node.mode):
                raise FsError(errno.EINVAL)
            self.ns.budget.reserve(ENGINE_COST)  # given back in _release
            content = node.content = FileContent(self.store, self.block_size, self.ns.budget)
        return content

    def _log_integrity(self, e: IntegrityError) -> None:
        """The WARNING line for a file whose blob failed a check (its reply is EIO)."""
        path = "-"
        if e.ino is not None:
            try:
                path = self.ns.path_of(self.ns.get(e.ino))
            except FsError:
                path = "<released>"
        log.warning(
            "event=integrity_failure path=%s ino=%s block=%s reason=%s",
            path,
            "-" if e.ino is None else e.ino,
            "-" if e.block is None else e.block,
            e.reason,
        )

    def _using(self, node: Inode, *, write: bool) -> AsyncContextManager[FileContent]:
        """The open-file rule (OpenFileTable.using), the content engine made on first use. An
        IntegrityError inside (a missing, replaced or tampered blob) leaves stamped with the
        inode and becomes EIO with one WARNING line in `handler`."""
        self._content(node)
        return self.files.using(node, write=write)

    async def _truncate(self, node: Inode, size: int) -> None:
        async with self._using(node, write=True) as content:
            content.truncate(size)

    def _release(self, node: Inode | None) -> None:
        """Destroy a dropped inode's key and blob. Never raises (forget cannot fail)."""
        if node is None:
            return
        if node.content is not None:
            try:
                node.content.destroy()
            except OSError as e:
                log.warning(
                    "event=shred_incomplete ino=%d errno=%s", node.ino, errno.errorcode.get(e.errno or 0, e.errno)
                )
            node.content = None
            self.ns.budget.adjust(-ENGINE_COST)
        self.files.forget_lock(node)
        self._lost_writes.discard(node.ino)

    def destroy_all(self) -> int:
        """Unmount: drop every key and remove every blob; returns the number of files shredded."""
        count = 0
        for node in self.ns.all_inodes():
            if node.content is not None:
                node.content.destroy()
                node.content = None
                count += 1
        self.files.clear()
        self.store.wipe_all()
        return count

    def _new_node(
        self, parent: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext, target: bytes | None = None
    ) -> Inode:
        node = self.ns.create(parent, name, mode, ctx.uid, ctx.gid, target)
        self.ns.remember(node)
        return node

    # --- namespace -------------------------------------------------------------------------------
    @handler
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        try:
            node = self.ns.lookup(parent_inode, name)
        except FsError as e:
            if e.errno != errno.ENOENT:
                raise
            # Negative entry: every namespace change passes through this kernel, which drops
            # negative dentries itself on create, so caching "does not exist" is safe and saves
            # a request per new file (tar, compilers and scanners probe before they create).
            miss = pyfuse3.EntryAttributes()
            miss.st_ino = 0
            miss.entry_timeout = self.attr_timeout
            return miss
        self.ns.remember(node)
        return self._attrs(node)

    @handler
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            self._release(self.ns.forget(ino, count))

    @handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(self.ns.get(inode))

    @handler
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self.ns.get(inode)
        t = now_ns()
        if fields.update_size:
            if attr.st_size > self.limits.max_file_size:
                raise FsError(errno.EFBIG)
            await self._truncate(node, attr.st_size)
            self._lost_writes.discard(node.ino)
            if not fields.update_mtime:
                node.mtime_ns = t
        if fields.update_mode:
            node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            node.uid = attr.st_uid
        if fields.update_gid:
            node.gid = attr.st_gid
        if fields.update_atime:
            node.atime_ns = attr.st_atime_ns
        if fields.update_mtime:
            node.mtime_ns = attr.st_mtime_ns
        node.ctime_ns = attr.st_ctime_ns if fields.update_ctime else t
        return self._attrs(node)

    @handler
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self.ns.get(inode)
        if node.target is None:
            raise FsError(errno.EINVAL)
        return node.target

    @handler
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node = self._new_node(parent_inode, name, mode, ctx)
        node.rdev = rdev
        return self._attrs(node)

    @handler
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._attrs(self._new_node(parent_inode, name, stat.S_IFDIR | stat.S_IMODE(mode), ctx))

    @handler
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._attrs(self._new_node(parent_inode, name, stat.S_IFLNK | 0o777, ctx, target=target))

    @handler
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node = self.ns.link(inode, new_parent_inode, new_name)
        self.ns.remember(node)
        return self._attrs(node)

    @handler
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = self.ns.unlink(parent_inode, name)
        self._release(self.ns.release_if_unused(node))

    @handler
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = self.ns.rmdir(parent_inode, name)
        self._release(self.ns.release_if_unused(node))

    @handler
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        released = self.ns.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)
        if released is not None:
            self._release(self.ns.release_if_unused(released))

    # --- files -----------------------------------------------------------------------------------
    def _open_handle(self, node: Inode, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        fh = self.files.open(node, kill_suid=ctx.uid != 0)
        return pyfuse3.FileInfo(fh=fh, keep_cache=self.keep_cache, direct_io=self.direct_io)

    @handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self.ns.get(inode)
        if node.directory is not None:
            raise FsError(errno.EISDIR)
        if not stat.S_ISREG(node.mode):
            raise FsError(errno.ENXIO)  # device nodes, fifos and sockets are not served by us
        # Every handle is charged to the memory budget (ENFILE when it is spent), before the
        # truncation below, so that a refused open changes nothing.
        self.ns.budget.reserve(HANDLE_COST, err=errno.ENFILE)
        try:
            if flags & os.O_TRUNC and flags & os.O_ACCMODE != os.O_RDONLY:
                # libfuse negotiates atomic O_TRUNC: the kernel leaves the truncation to us.
                await self._truncate(node, 0)
                node.mtime_ns = node.ctime_ns = now_ns()
        except BaseException:
            self.ns.budget.adjust(-HANDLE_COST)
            raise
        return self._open_handle(node, ctx)

    @handler
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        node = self._new_node(parent_inode, name, stat.S_IFREG | stat.S_IMODE(mode), ctx)
        # The handle's charge cannot be refused once the file exists (at most one handle past the budget).
        self.ns.budget.adjust(HANDLE_COST)
        return self._open_handle(node, ctx), self._attrs(node)

    @handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        node = self.files.get(fh).node
        content = self._content(node)
        if node.ino in self._lost_writes and off + size > content.size:
            raise FsError(errno.EIO)  # the kernel thinks data is there that we could never store
        async with self._using(node, write=False):
            data = content.read(off, size)
        # pyfuse3 takes any contiguous buffer (PyObject_GetBuffer); its stub says bytes.
        # relatime: atime moves only if older than mtime/ctime or a day old.
        if node.atime_ns <= node.mtime_ns or node.atime_ns <= node.ctime_ns or now_ns() - node.atime_ns > DAY_NS:
            node.atime_ns = now_ns()
        return cast(bytes, data)

    @handler
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self.files.get(fh)
        node = h.node
        owner_request.set(node.uid in self.owners)  # no request context: the reserve serves the owner's files
        room = self.limits.max_file_size - off
        crossing = room < len(buf)
        if crossing:
            if self.enable_writeback_cache:
                self._lose_writes(node, off)
            if room <= 0:
                raise FsError(errno.EFBIG)
            buf = memoryview(buf)[:room]  # type: ignore[assignment]  # a short write up to the limit, as POSIX asks
        if self.direct_io and h.kill_suid and node.mode & (stat.S_ISUID | stat.S_ISGID):
            self._kill_suid(node)
        async with self._using(node, write=True) as content:
            try:
                written = content.write(off, buf)
            except OSError as e:
                # Deleted files' blobs may still wait in the removal queue (scratchfs/reaper.py):
                # free that space now and retry once, so that rm then write works as anywhere.
                # content.write leaves the old state on failure, so the retry starts clean.
                if e.errno not in (errno.ENOSPC, errno.EDQUOT) or not self.store.free_queued():
                    raise
                written = content.write(off, buf)
        node.mtime_ns = node.ctime_ns = now_ns()
        if crossing and self.enable_writeback_cache:
            # The kernel ignores a short count from writeback (the writer already got its full
            # count from write(2)), so the tail would vanish without a word: keep what fits and
            # fail the request, which the writer then sees as EFBIG at fsync and EIO at close.
            raise FsError(errno.EFBIG)
        return written

    def _lose_writes(self, node: Inode, off: int) -> None:
        if node.ino not in self._lost_writes:
            self._lost_writes.add(node.ino)
            log.warning(
                "event=cached_write_refused path=%s ino=%d offset=%d max_file_size=%d",
                self.ns.path_of(node),
                node.ino,
                off,
                self.limits.max_file_size,
            )

    @staticmethod
    def _kill_suid(node: Inode) -> None:
        """What the kernel does on a page-cache write by a process without CAP_FSETID
        (should_remove_suid): under direct I/O it leaves it to us (FUSE_WRITE_KILL_SUIDGID,
        which pyfuse3 3.5 does not pass on, so the opener's identity decides)."""
        mode = node.mode & ~stat.S_ISUID
        if mode & stat.S_IXGRP:
            mode &= ~stat.S_ISGID
        if mode != node.mode:
            node.mode = mode
            node.ctime_ns = now_ns()
            # The one attribute we change that the kernel does not re-ask for: after a direct
            # write it drops only size, times and blocks (fuse_write_update_attr), so a mode-only
            # statx showed the set-id bits for the whole attribute timeout (the scratch profile's
            # is a day). Attributes only: no page is touched, so this cannot wait on writeback.
            try:
                pyfuse3.invalidate_inode(node.ino, attr_only=True)
            except OSError as e:  # ENOENT: the kernel holds no attributes of it to drop
                if e.errno != errno.ENOENT:
                    log.warning("event=attr_invalidate_failed ino=%d errno=%s", node.ino, e.errno)

    @handler
    async def flush(self, fh: int) -> None:
        # Nothing to do at close(2): data is in the blob when write returns, and POSIX locks
        # are kept by the kernel (we serve no lock ops). ENOSYS makes the kernel set
        # fc->no_flush and stop sending FLUSH for the life of the mount: one request less per
        # close. The kernel still writes back its dirty pages and reports their errors
        # (fuse_flush: write_inode_now + filemap_check_errors) before it would have asked us.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @handler
    async def release(self, fh: int) -> None:
        node = self.files.close(fh)
        if node is None:
            return
        self.ns.budget.adjust(-HANDLE_COST)
        self._release(self.ns.release_if_unused(node))

    @handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        node = self.files.get(fh).node
        async with self._using(node, write=False) as content:
            await trio.to_thread.run_sync(content.sync, datasync, limiter=self._limiter)

    @handler
    async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        # Semantics, checks and guarantees: scratchfs/fallocate.py. The kernel has already
        # refused a handle not open for writing (EBADF), a directory (EISDIR), other file
        # types (ENODEV) and PUNCH_HOLE without KEEP_SIZE (EOPNOTSUPP).
        node = self.files.get(fh).node
        owner_request.set(node.uid in self.owners)  # no request context, as for write
        falloc.check_request(mode, offset, length, self.limits.max_file_size)
        async with self._using(node, write=True) as content:
            falloc.check_space(content, mode, offset, offset + length)
            # Worker thread: a punch over many blocks or a zeroing fallback writes much.
            await trio.to_thread.run_sync(falloc.apply, content, mode, offset, length, limiter=self._limiter)
        node.mtime_ns = node.ctime_ns = now_ns()

    # --- directories -------------------------------------------------------------------------------
    @handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self.ns.directory(inode)
        return inode

    @handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        node, directory = self.ns.directory(fh)
        if start_id < 1:
            if not pyfuse3.readdir_reply(token, b".", self._attrs(node), 1):
                return
        if start_id < 2:
            parent = self.ns.get(node.name_hint[0] or ROOT_INO)
            if not pyfuse3.readdir_reply(token, b"..", self._attrs(parent), 2):
                return
        for cookie, name, ino in directory.entries_after(max(start_id, 2)):
            child = self.ns.get(ino)
            if not pyfuse3.readdir_reply(token, name, self._attrs(child), cookie):
                return
            self.ns.remember(child)

    @handler
    async def releasedir(self, fh: int) -> None:
        return None

    @handler
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        self.ns.directory(fh)

    @handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = self.store.statvfs()
        s = pyfuse3.StatvfsData()
        s.f_bsize = st.f_bsize
        s.f_frsize = st.f_frsize
        s.f_blocks = st.f_blocks
        s.f_bfree = st.f_bfree
        s.f_bavail = st.f_bavail
        # Inodes live in our memory, not the backing store: report our own limit (--max-inodes).
        s.f_files = self.limits.max_inodes
        s.f_ffree = s.f_favail = max(0, self.limits.max_inodes - len(self.ns))
        s.f_namemax = 255
        return s

    # --- xattrs ------------------------------------------------------------------------------------
    @staticmethod
    def _check_xattr_name(name: bytes) -> None:
        if len(name) > XATTR_NAME_MAX:
            raise FsError(errno.ERANGE)
        if not name:
            raise FsError(errno.EINVAL)
        if not name.startswith((b"user.", b"trusted.", b"security.")):
            raise FsError(errno.EOPNOTSUPP)  # as tmpfs: system.* (ACLs) and unknown namespaces

    @handler
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        if self.no_xattr:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        self._check_xattr_name(name)
        if name.startswith(VIRTUAL_XATTR_PREFIX):
            raise FsError(errno.EPERM)  # reserved for the read-only virtual xattrs
        if len(value) > XATTR_SIZE_MAX:
            raise FsError(errno.E2BIG)
        self.ns.setxattr(self.ns.get(inode), name, value)

    async def _virtual_xattr(self, node: Inode, name: bytes) -> bytes:
        """`user.scratchfs.block_size`, or `user.scratchfs.check_ranges.<offset>`: the byte
        ranges from <offset> on that `verify` must read ("first-last ...", then "next=<offset>"
        when there are more), so that it skips holes instead of reading 2^44 bytes of zeros."""
        if name == VIRTUAL_XATTR_PREFIX + b"block_size":
            return b"%d" % self.block_size
        if not name.startswith(CHECK_RANGES_XATTR) or not stat.S_ISREG(node.mode):
            raise FsError(pyfuse3.ENOATTR)
        tail = name[len(CHECK_RANGES_XATTR) :]
        if not tail.isdigit():
            raise FsError(errno.EINVAL)
        if node.content is None:
            return b""
        bs = self.block_size
        async with self._using(node, write=False) as content:
            runs = list(itertools.islice(content.check_runs(int(tail) // bs), CHECK_RANGES_PER_REPLY + 1))
        parts = [b"%d-%d" % (first * bs, min(content.size, (last + 1) * bs) - 1) for first, last in runs]
        if len(runs) > CHECK_RANGES_PER_REPLY:
            parts[-1] = b"next=%d" % (runs[-1][0] * bs)
        return b" ".join(parts)

    @handler
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if self.no_xattr:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        node = self.ns.get(inode)
        if len(name) > XATTR_NAME_MAX:
            raise FsError(errno.ERANGE)
        if name.startswith(VIRTUAL_XATTR_PREFIX):
            return await self._virtual_xattr(node, name)
        if not node.xattrs or name not in node.xattrs:
            raise FsError(pyfuse3.ENOATTR)
        return node.xattrs[name]

    @handler
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        if self.no_xattr:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        node = self.ns.get(inode)
        return list(node.xattrs) if node.xattrs else []

    @handler
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if self.no_xattr:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        self.ns.removexattr(self.ns.get(inode), name)

    @handler
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        node = self.ns.get(inode)
        if ctx.uid == 0:
            # root may do anything except execute a file nobody can execute
            return not (mode & os.X_OK) or node.is_dir or bool(node.mode & 0o111)
        if ctx.uid == node.uid:
            perm = (node.mode >> 6) & 7
        elif ctx.gid == node.gid or node.gid in pyfuse3.get_sup_groups(ctx.pid):
            perm = (node.mode >> 3) & 7
        else:
            perm = node.mode & 7
        return (mode & perm) == mode
