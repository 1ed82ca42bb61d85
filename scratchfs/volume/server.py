"""The userspace data path: a tiny FUSE filesystem serving the decrypted data segment.

The mount holds exactly one regular file, ``data``, whose bytes are the plaintext of the
volume's data segment. Reads and writes at any offset and length are translated into whole
encryption sectors of the image (read-modify-write at unaligned edges). The opener attaches
``data`` to a loop device and mounts it as ext4, the way dislocker serves BitLocker volumes.

This runs as its own process (pyfuse3 keeps global state: one process, one mount). The
volume master key arrives on an inherited pipe (``--key-fd``), never argv, environment or a file.
Readiness ("ok") or a one-line failure is written to ``--status-fd`` (scratchfs.keyholder.ready).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import stat
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pyfuse3
import trio

from scratchfs.exitcodes import EXIT_VOLUME_SERVER
from scratchfs.keyholder import logformat, ready
from scratchfs.keyholder.hardening import die_with_parent, harden_process
from scratchfs.keyholder.wipe import wipe
from scratchfs.volume.xts import SectorCodec, sector_span

log = logging.getLogger("scratchfs.volume.server")

DATA_NAME = b"data"
DATA_INODE = pyfuse3.ROOT_INODE + 1
# Requests at least this big go to a worker thread; smaller ones are cheaper inline. Unlike
# scratchfs's content path (fuse_ops.py), threads pay here although the cipher holds the GIL:
# requests hold sector-range locks, so several run at once and their image I/O (GIL released)
# overlaps. Inline measured 104/127 -> 87/85 MiB/s write, 188/203 -> 142/130 read (docs/bench.md).
THREAD_THRESHOLD = 64 * 1024


class SectorLocks:
    """Exclusive locks on sector ranges, so read-modify-write of shared sectors is atomic."""

    def __init__(self) -> None:
        self._held: list[tuple[int, int]] = []
        self._released = trio.Event()

    @asynccontextmanager
    async def hold(self, first: int, count: int) -> AsyncIterator[None]:
        """Wait until no held range overlaps [first, first+count), then hold it."""
        end = first + count
        while any(s < end and first < e for s, e in self._held):
            await self._released.wait()
        item = (first, end)
        self._held.append(item)
        try:
            yield
        finally:
            self._held.remove(item)
            self._released.set()
            self._released = trio.Event()


class SegmentFile:
    """Plaintext view of the data segment: byte-level read/write over encrypted sectors."""

    def __init__(self, fd: int, codec: SectorCodec, data_offset: int, size: int) -> None:
        self.fd = fd
        self.codec = codec
        self.data_offset = data_offset
        self.size = size
        self.ss = codec.sector_size

    def _read_sectors(self, first: int, count: int) -> bytearray:
        want = count * self.ss
        raw = os.pread(self.fd, want, self.data_offset + first * self.ss)
        if len(raw) != want:
            # The image is shorter than its header says: never invent data.
            raise OSError(errno.EIO, "image truncated")
        return self.codec.decrypt(first, raw)

    def read(self, offset: int, length: int) -> bytes:
        """Plaintext bytes [offset, offset+length), clipped at the end of the segment."""
        length = max(0, min(length, self.size - offset))
        if length == 0:
            return b""
        first, count = sector_span(offset, length, self.ss)
        plain = self._read_sectors(first, count)
        start = offset - first * self.ss
        return bytes(plain[start : start + length])

    def write(self, offset: int, data: bytes | memoryview) -> int:
        """Write plaintext at *offset*; partial edge sectors are read, merged and rewritten."""
        length = len(data)
        if offset + length > self.size:
            raise OSError(errno.ENOSPC, "write beyond the end of the volume")
        if length == 0:
            return 0
        ss = self.ss
        first, count = sector_span(offset, length, ss)
        start = offset - first * ss
        if start == 0 and length == count * ss:
            plain: bytearray | memoryview = memoryview(data)
        else:
            buf = bytearray(count * ss)
            if start:
                buf[:ss] = self._read_sectors(first, 1)
            tail = (start + length) % ss
            if tail and (count > 1 or not start):
                buf[-ss:] = self._read_sectors(first + count - 1, 1)
            buf[start : start + length] = data
            plain = buf
        cipher = self.codec.encrypt(first, plain)
        written = os.pwrite(self.fd, cipher, self.data_offset + first * ss)
        if written != len(cipher):
            raise OSError(errno.EIO, "short write to image")
        return length


class VolumeOps(pyfuse3.Operations):
    """FUSE translation layer: one directory, one file."""

    enable_writeback_cache = False

    def __init__(self, seg: SegmentFile) -> None:
        super().__init__()
        self.seg = seg
        self.locks = SectorLocks()
        self.limiter = trio.CapacityLimiter(max(2, os.cpu_count() or 2))
        self.uid = os.getuid()
        self.gid = os.getgid()

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.st_uid, a.st_gid = self.uid, self.gid
        if inode == pyfuse3.ROOT_INODE:
            a.st_mode = stat.S_IFDIR | 0o700
            a.st_nlink = 2
            a.st_size = 0
        elif inode == DATA_INODE:
            a.st_mode = stat.S_IFREG | 0o600
            a.st_nlink = 1
            a.st_size = self.seg.size
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        a.st_blksize = self.seg.ss
        a.st_blocks = (a.st_size + 511) // 512
        a.attr_timeout = a.entry_timeout = 3600.0
        return a

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name == DATA_NAME:
            return self._attr(DATA_INODE)
        if name in (b".", b".."):
            return self._attr(pyfuse3.ROOT_INODE)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> pyfuse3.EntryAttributes:
        # The size of the volume is fixed by its header; only no-op changes are accepted.
        if fields.update_size and attr.st_size != self._attr(inode).st_size:
            raise pyfuse3.FUSEError(errno.EPERM)
        return self._attr(inode)

    async def opendir(self, inode: int, ctx: Any) -> int:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, DATA_NAME, self._attr(DATA_INODE), 1)

    async def releasedir(self, fh: int) -> None:
        return None

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if inode != DATA_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        # direct_io: no second page cache under ext4's, and requests arrive at full size.
        return pyfuse3.FileInfo(fh=inode, direct_io=True, keep_cache=False)

    async def _run(self, big: bool, fn: Any, *args: Any) -> Any:
        try:
            if big:
                return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)
            return fn(*args)
        except OSError as e:
            log.warning("event=io_error op=%s errno=%s", fn.__name__, errno.errorcode.get(e.errno or 0))
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None

    async def read(self, fh: int, off: int, size: int) -> bytes:
        log.debug("event=read off=%d size=%d", off, size)
        first, count = sector_span(off, max(0, min(size, self.seg.size - off)), self.seg.ss)
        async with self.locks.hold(first, count):
            data: bytes = await self._run(size >= THREAD_THRESHOLD, self.seg.read, off, size)
            return data

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        log.debug("event=write off=%d size=%d", off, len(buf))
        first, count = sector_span(off, len(buf), self.seg.ss)
        async with self.locks.hold(first, count):
            n: int = await self._run(len(buf) >= THREAD_THRESHOLD, self.seg.write, off, buf)
            return n

    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._run(True, os.fdatasync if datasync else os.fsync, self.seg.fd)

    async def flush(self, fh: int) -> None:
        return None

    async def release(self, fh: int) -> None:
        return None

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = self.seg.ss
        s.f_blocks = self.seg.size // self.seg.ss
        s.f_bfree = s.f_bavail = 0
        s.f_files = 2
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s


def read_exact(fd: int, n: int) -> bytearray:
    """Read exactly *n* bytes from *fd* (a pipe), or raise."""
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise ValueError(f"key pipe closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


async def _serve(ops: VolumeOps) -> None:
    async with trio.open_nursery() as nursery:

        async def on_signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for sig in signals:
                    log.info("event=signal signal=%s", signal.Signals(sig).name)
                    pyfuse3.terminate()
                    return

        nursery.start_soon(on_signals)
        await pyfuse3.main(min_tasks=2, max_tasks=16)
        nursery.cancel_scope.cancel()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scratchfs-volume-server", description=__doc__)
    p.add_argument("--image", required=True)
    p.add_argument("--mountpoint", required=True)
    p.add_argument("--key-fd", type=int, required=True)
    p.add_argument("--key-size", type=int, required=True)
    p.add_argument("--status-fd", type=int, required=True)
    p.add_argument("--data-offset", type=int, required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--sector-size", type=int, required=True)
    p.add_argument("--iv-offset", type=int, default=0)
    p.add_argument("--iv-scheme", default="plain64", choices=["plain64", "plain"])
    p.add_argument(
        "--die-with-parent", action="store_true", help="stop when the starting process dies (used while formatting)"
    )
    p.add_argument("--parent-pid", type=int, default=0, help="with --die-with-parent: the starting process")
    p.add_argument("--debug", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the server process."""
    args = build_parser().parse_args(argv)
    logformat.setup(logging.DEBUG if args.debug else logging.INFO)
    # Hardened before the key is read: from here on this process holds the volume master key
    # for the life of the mount, so it gets what the scratchfs daemon gets (mlockall included).
    harden_process()
    if args.die_with_parent and not die_with_parent(signal.SIGTERM, args.parent_pid):
        ready.write_error(args.status_fd, EXIT_VOLUME_SERVER, "its starter died before it was supervised")
        return EXIT_VOLUME_SERVER
    try:
        key = read_exact(args.key_fd, args.key_size)
    except (OSError, ValueError) as e:
        ready.write_error(args.status_fd, EXIT_VOLUME_SERVER, f"cannot read the volume master key: {e}")
        return EXIT_VOLUME_SERVER
    finally:
        os.close(args.key_fd)
    try:
        codec = SectorCodec(key, args.sector_size, args.iv_offset, args.iv_scheme)
    finally:
        wipe(key)
    try:
        fd = os.open(args.image, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        ready.write_error(args.status_fd, EXIT_VOLUME_SERVER, f"cannot open {args.image}: {e.strerror}")
        return EXIT_VOLUME_SERVER
    seg = SegmentFile(fd, codec, args.data_offset, args.size)
    ops = VolumeOps(seg)
    options = set(pyfuse3.default_options)
    options.discard("default_permissions")
    options |= {"fsname=scratchfs-volume", "default_permissions"}
    try:
        pyfuse3.init(ops, args.mountpoint, options)
    except RuntimeError as e:
        ready.write_error(args.status_fd, EXIT_VOLUME_SERVER, f"FUSE mount on {args.mountpoint} failed: {e}")
        os.close(fd)
        return EXIT_VOLUME_SERVER
    log.info(
        "event=serving image=%s mountpoint=%s size=%d sector_size=%d",
        args.image,
        args.mountpoint,
        args.size,
        args.sector_size,
    )
    ready.write_ok(args.status_fd)
    clean = False
    try:
        trio.run(_serve, ops)
        clean = True
    except BaseException:
        log.exception("event=serve_failed")
        raise
    finally:
        pyfuse3.close(unmount=True)
        os.fsync(fd)
        os.close(fd)
        log.info("event=stopped clean=%s", clean)
    return 0


if __name__ == "__main__":
    sys.exit(main())
