"""Mount lifecycle: validate, harden, mount, serve, and always shred on the way out.

`serve()` runs in the daemon process. `spawn_daemon()` runs in the CLI process: it starts the
daemon as a detached child and waits on a pipe until the daemon says the mount is live (or why it
is not), so `scratchfs mount` returns only once the mount can be used.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

from scratchfs import blocks, request_loop
from scratchfs.errors import StoreError
from scratchfs.exitcodes import (
    EXIT_BACKING,
    EXIT_DAEMON,
    EXIT_INTERNAL,
    EXIT_MOUNTPOINT,
    EXIT_NO_FUSE,
    EXIT_OK,
    EXIT_USAGE,
)
from scratchfs.fuse_ops import ScratchOps
from scratchfs.keyholder import mountinfo, ready
from scratchfs.keyholder.hardening import harden_process
from scratchfs.limits import (
    DEFAULT_MAX_INODES,
    DEFAULT_MAX_XATTR_BYTES,
    DEFAULT_MAX_XATTRS,
    DEFAULT_MEMORY_BUDGET,
    DEFAULT_OWNER_RESERVE_PERCENT,
    MAX_LFS_FILESIZE,
    Limits,
)
from scratchfs.reaper import DEFAULT_CAPACITY, BlobReaper
from scratchfs.stats import RequestStats
from scratchfs.store import BlobStore

log = logging.getLogger("scratchfs.mount")

FSTYPE = "fuse.scratchfs"
# Requests carry at most 1 MiB (libfuse's max_pages 256); a 4 MiB readahead window keeps up to
# four of them in flight, so worker threads decrypt one while the trio thread replies to
# another. Measured against 1 MiB (3 interleaved runs, 512 MiB cold stream): +20 %, +47 %, +47 %.
DEFAULT_READAHEAD_KB = 4096


class MountError(Exception):
    """A reason not to mount, with its exit code; the message is one line for the user."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class MountOptions:
    """What `scratchfs mount` was asked to do."""

    backing: Path
    mountpoint: Path
    block_size: int = blocks.DEFAULT_BLOCK_SIZE
    allow_other: bool = False
    debug: bool = False
    strict: bool = False
    attr_timeout: float = 1.0
    writeback: bool = False
    lock_memory: bool = True
    readahead_kb: int = DEFAULT_READAHEAD_KB
    direct_io: bool = False
    pid_file: Path | None = None
    max_file_size: int = 0  # 0: the largest the backing store can hold
    max_inodes: int = DEFAULT_MAX_INODES
    max_xattrs: int = DEFAULT_MAX_XATTRS
    max_xattr_bytes: int = DEFAULT_MAX_XATTR_BYTES
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    owner_reserve_percent: int = DEFAULT_OWNER_RESERVE_PERCENT
    extra: list[str] = field(default_factory=list)
    no_xattr: bool = False
    keep_cache: bool = False
    stats_file: Path | None = None
    removal_queue: int = DEFAULT_CAPACITY
    spin_us: int | None = None  # None: request_loop.default_spin_us()


def mount_limits(opts: MountOptions) -> Limits:
    """The mount's limits (file size: the kernel's own, unless asked for less)."""
    return Limits(
        max_file_size=min(opts.max_file_size or MAX_LFS_FILESIZE, MAX_LFS_FILESIZE),
        max_inodes=opts.max_inodes,
        max_xattrs=opts.max_xattrs,
        max_xattr_bytes=opts.max_xattr_bytes,
        memory_budget=opts.memory_budget,
        owner_reserve_percent=opts.owner_reserve_percent,
    )


def daemon_pid(entry: mountinfo.MountEntry) -> int | None:
    """The serving daemon's PID of a scratchfs mount, which we put in the mount's source name."""
    prefix = "scratchfs-"
    if entry.fstype == FSTYPE and entry.source.startswith(prefix) and entry.source[len(prefix) :].isdigit():
        return int(entry.source[len(prefix) :])
    return None


def find_mount(path: Path) -> mountinfo.MountEntry | None:
    """The visible mount whose mount point is exactly *path*, if any."""
    return mountinfo.find(path)


def check_fuse_available() -> None:
    """MountError(EXIT_NO_FUSE) if this machine cannot mount FUSE filesystems."""
    if not os.path.exists("/dev/fuse"):
        raise MountError(
            EXIT_NO_FUSE, "/dev/fuse is missing; load the fuse module (modprobe fuse) or run where FUSE is available"
        )
    if os.geteuid() != 0 and shutil.which("fusermount3") is None:
        raise MountError(EXIT_NO_FUSE, "fusermount3 is missing; install the fuse3 package")


def check_mountpoint(path: Path) -> None:
    """MountError(EXIT_MOUNTPOINT) unless *path* is an existing, empty, unmounted directory."""
    try:
        entries = os.listdir(path)
    except FileNotFoundError:
        raise MountError(EXIT_MOUNTPOINT, f"mountpoint {path} does not exist; create an empty directory") from None
    except NotADirectoryError:
        raise MountError(EXIT_MOUNTPOINT, f"mountpoint {path} is not a directory; give an empty directory") from None
    except OSError as e:
        if e.errno in mountinfo.STALE_ERRNOS:
            raise MountError(
                EXIT_MOUNTPOINT, f"{path} is a stale mount of a daemon that died; run 'scratchfs umount {path}' first"
            ) from None
        raise MountError(EXIT_MOUNTPOINT, f"cannot read mountpoint {path}: {e.strerror}") from None
    if find_mount(path) is not None:
        raise MountError(EXIT_MOUNTPOINT, f"{path} is already mounted; unmount it first or choose another directory")
    if entries:
        raise MountError(
            EXIT_MOUNTPOINT, f"mountpoint {path} is not empty (found {sorted(entries)[0]!r}); use an empty directory"
        )


def check(opts: MountOptions) -> None:
    """All checks before mounting, in the order a user would fix them. Touches nothing."""
    check_fuse_available()
    if os.path.realpath(opts.backing) == os.path.realpath(opts.mountpoint):
        raise MountError(EXIT_USAGE, "backing directory and mountpoint must be different directories")
    check_mountpoint(opts.mountpoint)
    try:
        BlobStore.check(opts.backing)
    except StoreError as e:
        raise MountError(EXIT_BACKING, str(e)) from None


def prepare(opts: MountOptions) -> BlobStore:
    """check(), then open the store: claim it if empty, wipe what a crashed daemon left."""
    check(opts)
    try:
        return BlobStore.open(opts.backing)
    except StoreError as e:
        raise MountError(EXIT_BACKING, str(e)) from None


def _fuse_options(opts: MountOptions) -> set[str]:
    fuse_opts = set(pyfuse3.default_options)  # default_permissions: the kernel checks access
    # The source name carries our PID so that `scratchfs umount` can wait for this daemon.
    fuse_opts |= {f"fsname=scratchfs-{os.getpid()}", "subtype=scratchfs"}
    if opts.allow_other:
        fuse_opts.add("allow_other")
    return fuse_opts


async def _tune_readahead(mountpoint: Path, readahead_kb: int) -> None:
    """Raise the kernel's readahead for this mount (default 128 KiB) so streaming reads arrive
    in large requests: per-request cost, not crypto, bounds FUSE throughput. Root only; the
    stat must run once the FUSE loop serves requests, hence a task."""
    try:
        st = await trio.to_thread.run_sync(os.stat, mountpoint)
        bdi = Path(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb")
        await trio.to_thread.run_sync(bdi.write_text, f"{readahead_kb}\n")
        log.info("event=readahead_set kb=%d", readahead_kb)
    except OSError as e:
        log.info("event=readahead_unchanged reason=%s", e.strerror)


async def _serve_until_done(
    ops: ScratchOps, readahead_kb: int = 0, reaper: BlobReaper | None = None, loop_kwargs: dict[str, int] | None = None
) -> None:
    """Run the FUSE loop until the mount goes away or we are told to stop."""
    async with trio.open_nursery() as nursery:

        async def on_signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                async for signum in signals:
                    log.info("event=signal signal=%s action=unmount", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    return

        async def on_stats_request() -> None:
            # SIGUSR1: dump the request counters (benchmarks snapshot them around workloads).
            with trio.open_signal_receiver(signal.SIGUSR1) as signals:
                async for _ in signals:
                    ops.stats.dump()

        nursery.start_soon(on_signals)
        if reaper is not None:
            nursery.start_soon(reaper.run)
        nursery.start_soon(on_stats_request)
        if readahead_kb:
            nursery.start_soon(_tune_readahead, ops.mountpoint, readahead_kb)
        await pyfuse3.main(min_tasks=4, max_tasks=64, **(loop_kwargs or {}))
        nursery.cancel_scope.cancel()


def serve(opts: MountOptions, store: BlobStore, ready: Callable[[], None] | None = None) -> int:
    """Mount and serve until unmounted or signalled; always shred keys and blobs afterwards."""
    harden_process(lock_memory=opts.lock_memory)
    limits = mount_limits(opts)
    ops = ScratchOps(
        store,
        opts.block_size,
        debug=opts.debug,
        strict=opts.strict,
        attr_timeout=opts.attr_timeout,
        limits=limits,
        stats=RequestStats(opts.stats_file),
        no_xattr=opts.no_xattr,
    )
    ops.keep_cache = opts.keep_cache
    ops.enable_writeback_cache = opts.writeback
    ops.mountpoint = opts.mountpoint
    ops.direct_io = opts.direct_io
    if not hasattr(pyfuse3.Operations, "fallocate"):
        # A stock pyfuse3 (not make setup's build, third_party/pyfuse3): it never hands us
        # FALLOCATE, so the kernel answers every fallocate(2) with EOPNOTSUPP. Serve the rest.
        log.warning("event=fallocate_unavailable pyfuse3=%s fix=%s", pyfuse3.__version__, "make setup")
    try:
        pyfuse3.init(ops, str(opts.mountpoint), _fuse_options(opts))
    except RuntimeError as e:
        store.close()
        raise MountError(
            EXIT_DAEMON, f"the kernel refused the mount ({e}); check /dev/fuse permissions and mount options"
        ) from None
    loop_kwargs = request_loop.main_kwargs(opts.spin_us)
    log.info(
        "event=mounted mountpoint=%s backing=%s block_size=%d pid=%d max_file_size=%d max_inodes=%d "
        "memory_budget=%d backing_max_blob=%d spin_ns=%s",
        opts.mountpoint,
        opts.backing,
        opts.block_size,
        os.getpid(),
        limits.max_file_size,
        limits.max_inodes,
        limits.memory_budget,
        store.size_limit,  # probed now, not in the first write's request
        loop_kwargs.get("spin_ns", "unsupported"),
    )
    reaper = BlobReaper(store.remove_now, capacity=opts.removal_queue)
    try:
        if opts.pid_file is not None:
            opts.pid_file.write_text(f"{os.getpid()}\n")
        if ready is not None:
            ready()
        if opts.removal_queue > 0:
            store.defer_removal = reaper.defer
            store.drain_removals = reaper.drain
        trio.run(_serve_until_done, ops, opts.readahead_kb, reaper, loop_kwargs)
    finally:
        store.defer_removal = store.drain_removals = None
        reaper.drain()
        reaper.log_summary()
        try:
            pyfuse3.close(unmount=True)
        except Exception as e:  # noqa: BLE001 - the mount may already be gone; shredding must still run
            log.info("event=close_after_unmount detail=%s", type(e).__name__)
        shredded = ops.destroy_all()
        store.close()
        log.info("event=unmounted mountpoint=%s files_shredded=%d", opts.mountpoint, shredded)
        log.info("event=request_counts %s", ops.stats.log_fields())
        try:
            ops.stats.dump()
        except OSError as e:
            log.warning("event=stats_file_unwritable errno=%s", errno.errorcode.get(e.errno or 0, e.errno))
    return EXIT_INTERNAL if ops.internal_errors else EXIT_OK


# --- daemon start-up (CLI side) -----------------------------------------------------------------
def spawn_daemon(argv: list[str], log_file: Path | None, timeout: float = 30.0) -> tuple[int, str]:
    """Start `python -m scratchfs mount ... --foreground --ready-fd N` detached; wait for its word.

    Returns (exit code, message), from the daemon's word on the readiness pipe
    (scratchfs.keyholder.ready); silence until EOF means it died.
    """
    read_fd, write_fd = os.pipe()
    if log_file is not None:
        stderr: int = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    else:
        stderr = subprocess.DEVNULL
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "scratchfs", *argv, "--foreground", "--ready-fd", str(write_fd)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            pass_fds=(write_fd,),
            start_new_session=True,
            close_fds=True,
        )
    finally:
        os.close(write_fd)
        if log_file is not None:
            os.close(stderr)
    try:
        word = ready.read_word(read_fd, timeout)
    finally:
        os.close(read_fd)
    if word.ok:
        return EXIT_OK, ""
    if word.code is not None:
        proc.wait(timeout=10)
        return word.code, word.message
    try:
        rc = proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
    where = f"; see {log_file}" if log_file else "; run with --foreground to see why"
    return EXIT_DAEMON, f"the daemon exited (status {rc}) before the mount was live{where}"
