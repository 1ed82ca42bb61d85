"""`scratchfs` command line: mount, umount, verify, volume.

Every user mistake ends in one line on stderr and a documented exit code (README.md,
declared in scratchfs/exitcodes.py); a
traceback appears only with --debug.
"""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import subprocess
import sys
from pathlib import Path

from scratchfs import blocks
from scratchfs.exitcodes import EXIT_BUSY, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_NOT_MOUNTED, EXIT_OK, EXIT_USAGE
from scratchfs.keyholder import fusectl, logformat, mountinfo, procs, ready
from scratchfs.limits import (
    DEFAULT_MAX_INODES,
    DEFAULT_MAX_XATTR_BYTES,
    DEFAULT_MAX_XATTRS,
    DEFAULT_MEMORY_BUDGET,
    DEFAULT_OWNER_RESERVE_PERCENT,
    MAX_OWNER_RESERVE_PERCENT,
)
from scratchfs.mount import (
    DEFAULT_READAHEAD_KB,
    FSTYPE,
    MountError,
    MountOptions,
    check,
    daemon_pid,
    find_mount,
    prepare,
    serve,
    spawn_daemon,
)
from scratchfs.profiles import DEFAULT_PROFILE, PROFILES
from scratchfs.reaper import DEFAULT_CAPACITY
from scratchfs.request_loop import DEFAULT_SPIN_US, MAX_SPIN_US

PROG = "scratchfs"


class UsageError(Exception):
    """Bad command-line input (exit 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message}; see '{self.prog} --help'")


def _block_size(text: str) -> int:
    try:
        value = int(text, 0)
        return blocks.check_block_size(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {value}")
    return value


def _spin_us(text: str) -> int:
    """Request-loop spin in µs, 0..MAX_SPIN_US."""
    value = _non_negative(text)
    if value > MAX_SPIN_US:
        raise argparse.ArgumentTypeError(f"at most {MAX_SPIN_US}: {value}")
    return value


def _percent(text: str) -> int:
    """A whole percentage of the budget, 0..MAX_OWNER_RESERVE_PERCENT."""
    try:
        value = int(text.strip().removesuffix("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole percentage (example: 5)") from None
    if not 0 <= value <= MAX_OWNER_RESERVE_PERCENT:
        raise argparse.ArgumentTypeError(f"must be between 0 and {MAX_OWNER_RESERVE_PERCENT}: {value}")
    return value


_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50, "E": 1 << 60}


def _count(text: str) -> int:
    """A positive byte count or number, with an optional K/M/G/T/P/E suffix (powers of 1024)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    suffix = t[-1:] if t[-1:] in _SUFFIXES else ""
    try:
        value = int(t[: len(t) - len(suffix)], 0) * _SUFFIXES[suffix]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (examples: 1000000, 512M, 16T)") from None
    if value <= 0 or value > (1 << 63) - 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be between 1 and 2^63-1")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used for --help)."""
    p = _Parser(prog=PROG, description="Encrypted scratch filesystem with keys held only in memory.")
    p.add_argument("--debug", action="store_true", help="log every FUSE request (never contents) and show tracebacks")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    m = sub.add_parser("mount", help="mount scratchfs on MOUNTPOINT, storing blobs in BACKING_DIR")
    m.add_argument("backing", type=Path, metavar="BACKING_DIR")
    m.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    m.add_argument("--foreground", "-f", action="store_true", help="stay in the foreground, log to stderr")
    m.add_argument("--debug", action="store_true", dest="debug_mount", help="log every FUSE request")
    m.add_argument(
        "--allow-other", action="store_true", help="let other users reach the mount (kernel permission checks stay on)"
    )
    m.add_argument(
        "--block-size",
        type=_block_size,
        default=blocks.DEFAULT_BLOCK_SIZE,
        help="plaintext block size in bytes (power of two, 512..1048576)",
    )
    m.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default=DEFAULT_PROFILE,
        help="; ".join(f"{name}: {p.summary}" for name, p in PROFILES.items())
        + " (options below add to the profile; --attr-timeout replaces its timeout)",
    )
    m.add_argument("--writeback-cache", action="store_true", help="let the kernel batch writes in its page cache")
    m.add_argument(
        "--attr-timeout",
        type=float,
        default=None,
        help="seconds the kernel may cache names and attributes (default: the profile's, 1 for posix)",
    )
    m.add_argument(
        "--readahead-kb",
        type=int,
        default=DEFAULT_READAHEAD_KB,
        help="kernel readahead for the mount (root only; 0 keeps 128)",
    )
    m.add_argument(
        "--direct-io",
        action="store_true",
        help="bypass the page cache: each read/write is atomic against concurrent writers; no shared mmap",
    )
    m.add_argument(
        "--max-file-size",
        type=_count,
        default=0,
        help="largest file size (EFBIG beyond; default and cap: what the backing store can hold)",
    )
    m.add_argument(
        "--max-inodes",
        type=_count,
        default=DEFAULT_MAX_INODES,
        help="files, directories, symlinks (ENOSPC beyond; statfs reports it)",
    )
    m.add_argument("--max-xattrs", type=_count, default=DEFAULT_MAX_XATTRS, help="xattrs per inode (ENOSPC beyond)")
    m.add_argument(
        "--max-xattr-bytes",
        type=_count,
        default=DEFAULT_MAX_XATTR_BYTES,
        help="xattr names+values per inode, bytes (ENOSPC beyond)",
    )
    m.add_argument(
        "--memory-budget",
        type=_count,
        default=DEFAULT_MEMORY_BUDGET,
        help="bytes of metadata (inodes, names, xattrs, block maps) the daemon may hold (ENOSPC beyond)",
    )
    m.add_argument(
        "--owner-reserve",
        type=_percent,
        default=DEFAULT_OWNER_RESERVE_PERCENT,
        metavar="PERCENT",
        help="share of --memory-budget and --max-inodes that only the mount's owner and root may use, as ext4's "
        f"reserved blocks: other users get ENOSPC first (0..{MAX_OWNER_RESERVE_PERCENT}, default "
        f"{DEFAULT_OWNER_RESERVE_PERCENT})",
    )
    m.add_argument("--strict", action="store_true", help="exit non-zero if any internal error happened (tests)")
    m.add_argument("--no-mlock", action="store_true", help="do not lock memory (mlockall)")
    m.add_argument("--pid-file", type=Path, help="write the daemon's PID here once the mount is live")
    m.add_argument("--log-file", type=Path, help="append the daemon's log here (default: syslog when daemonized)")
    m.add_argument(
        "--ready-fd",
        type=int,
        metavar="FD",
        help="with --foreground: write 'ok' (or 'err CODE MESSAGE') to this inherited fd once the mount is live "
        "(for supervisors such as the agent)",
    )
    m.add_argument(
        "--no-xattr",
        action="store_true",
        help="no extended attributes (ENOSYS, cached by the kernel): saves a request per write and per ls -l entry",
    )
    m.add_argument(
        "--keep-cache",
        action="store_true",
        help="keep the kernel's page cache of a file across opens (a file read after writing is not decrypted again)",
    )
    m.add_argument(
        "--removal-queue",
        type=_non_negative,
        default=DEFAULT_CAPACITY,
        metavar="N",
        help=f"blob files of shredded files waiting for removal off the request path (default {DEFAULT_CAPACITY}; "
        "0 removes them inline); keys are always destroyed at once",
    )
    m.add_argument(
        "--spin-us",
        type=_spin_us,
        default=None,
        metavar="US",
        help=f"microseconds the request loop polls for the next request before it sleeps (default "
        f"{DEFAULT_SPIN_US} with more than one CPU, else 0; 0 never polls; at most {MAX_SPIN_US})",
    )
    m.add_argument(
        "--stats-file",
        type=Path,
        help="write per-operation request counts (JSON) here at unmount and on SIGUSR1",
    )

    u = sub.add_parser("umount", help="unmount (also clears a stale mount left by a killed daemon)")
    u.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    u.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the daemon to shred and exit")

    v = sub.add_parser("verify", help="read every file through the mount and report corrupted blocks")
    v.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")

    import importlib

    try:
        volume_cli = importlib.import_module("scratchfs.volume.cli")
    except ImportError:
        volume_cli = None
    if volume_cli is not None and hasattr(volume_cli, "register"):
        vol = sub.add_parser("volume", help="LUKS2 volumes for the backing store")
        vol_sub = vol.add_subparsers(dest="volume_command", parser_class=_Parser)
        volume_cli.register(vol_sub)
    return p


def _setup_logging(level: int, log_file: Path | None, daemon: bool) -> None:
    if log_file is not None or not daemon:
        logformat.setup(level)
    elif os.path.exists("/dev/log"):
        # syslog stamps the line itself.
        logformat.setup(level, logging.handlers.SysLogHandler(address="/dev/log"), timestamps=False)
    else:
        logformat.setup(level, logging.NullHandler())


def cmd_mount(args: argparse.Namespace) -> int:
    """`scratchfs mount`: daemonize (default) or serve in the foreground."""
    profile = PROFILES[args.profile]
    opts = MountOptions(
        backing=args.backing.absolute(),
        mountpoint=args.mountpoint.absolute(),
        block_size=args.block_size,
        allow_other=args.allow_other,
        debug=args.debug_mount or args.debug,
        strict=args.strict,
        attr_timeout=profile.attr_timeout if args.attr_timeout is None else args.attr_timeout,
        writeback=args.writeback_cache or profile.writeback,
        lock_memory=not args.no_mlock,
        readahead_kb=args.readahead_kb,
        direct_io=args.direct_io,
        pid_file=args.pid_file.absolute() if args.pid_file else None,
        max_file_size=args.max_file_size,
        max_inodes=args.max_inodes,
        max_xattrs=args.max_xattrs,
        max_xattr_bytes=args.max_xattr_bytes,
        memory_budget=args.memory_budget,
        owner_reserve_percent=args.owner_reserve,
        no_xattr=args.no_xattr or profile.no_xattr,
        keep_cache=args.keep_cache or profile.keep_cache,
        removal_queue=args.removal_queue,
        stats_file=args.stats_file.absolute() if args.stats_file else None,
        spin_us=args.spin_us,
    )
    if not args.foreground:
        # Check in the foreground first so the common mistakes get their own exit code at once.
        check(opts)
        argv = [a for a in args.raw_argv if a not in ("--foreground", "-f")]
        if args.log_file is not None:
            args.log_file.parent.mkdir(parents=True, exist_ok=True)
        code, message = spawn_daemon(argv, args.log_file)
        if code != EXIT_OK:
            raise MountError(code, message)
        return EXIT_OK

    daemonized = args.ready_fd is not None
    _setup_logging(logging.DEBUG if opts.debug else logging.INFO, args.log_file, daemonized)

    def say_ok() -> None:
        if args.ready_fd is not None:
            ready.write_ok(args.ready_fd)

    try:
        store = prepare(opts)
        return serve(opts, store, say_ok)
    except MountError as e:
        if args.ready_fd is not None:
            ready.write_error(args.ready_fd, e.code, str(e))
        raise


def cmd_umount(args: argparse.Namespace) -> int:
    """`scratchfs umount`: unmount, clear a stale mount, wait for the daemon to finish shredding."""
    path = args.mountpoint.absolute()
    entry = find_mount(path)
    if entry is None:
        raise MountError(EXIT_NOT_MOUNTED, f"{path} is not mounted; nothing to do")
    if not entry.fstype.startswith("fuse"):
        raise MountError(EXIT_NOT_MOUNTED, f"{path} is a {entry.fstype} mount, not scratchfs; use umount(8)")
    pid = daemon_pid(entry)
    # Pinned before unmounting: once the daemon exits its pid may be reused, and we must not
    # wait for a stranger.
    started = procs.start_time(pid) if pid is not None else None
    stale = mountinfo.is_stale(path)
    cmd = ["fusermount3", "-u", "-q", str(path)] if not stale else ["fusermount3", "-u", "-z", "-q", str(path)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0 and os.geteuid() == 0:
        # fusermount3 refuses mounts it did not make for another user; root can use umount2.
        result = subprocess.run(
            ["umount", *(["-l"] if stale else []), str(path)], capture_output=True, text=True, check=False
        )
    if result.returncode != 0:
        detail = (result.stderr.strip().splitlines() or ["unknown error"])[-1]
        if "busy" in detail.lower():
            users = procs.users_of(str(path))
            who = (
                " by " + ", ".join(f"{pid} ({comm})" for pid, comm in sorted(users.items())[:8])
                + (" ..." if len(users) > 8 else "")
                if users
                else ""
            )
            raise MountError(
                EXIT_BUSY, f"{path} is busy (files open or a working directory inside it{who}); close them and retry"
            )
        raise MountError(EXIT_INTERNAL, f"cannot unmount {path}: {detail}")
    if not stale and entry.device:
        _end_copies_elsewhere(path, entry.device)
    if pid is not None and started is not None:
        if not procs.wait_gone(pid, started, args.timeout):
            raise MountError(
                EXIT_BUSY,
                f"unmounted {path} but daemon {pid} is still shredding after {args.timeout:.0f}s; wait and check",
            )
    return EXIT_OK


def _end_copies_elsewhere(path: Path, device: str) -> None:
    """After our copy is unmounted: end the connection if other mount namespaces still hold one.

    See scratchfs/keyholder/fusectl.py for why; a bind mount in our own namespace is the
    user's: it is left alone and named in the error.
    """
    elsewhere_here = fusectl.same_namespace_copies(device)
    if elsewhere_here:
        raise MountError(
            EXIT_BUSY,
            f"unmounted {path}, but the same file system is still mounted at {', '.join(elsewhere_here)}; "
            "unmount those too",
        )
    holders = fusectl.holders_elsewhere(device)
    if not holders:
        return
    shown = ", ".join(map(str, holders[:5])) + (" ..." if len(holders) > 5 else "")
    try:
        aborted = fusectl.abort(device)
    except OSError as e:
        raise MountError(
            EXIT_BUSY,
            f"unmounted {path} here, but mount namespaces of pids {shown} still hold it and its "
            f"connection cannot be ended ({e}); end those processes or rerun as root",
        ) from None
    if aborted:
        print(
            f"{PROG}: {path} was still mounted in the mount namespaces of pids {shown}; "
            "ended its FUSE connection so the daemon can shred",
            file=sys.stderr,
        )


def cmd_verify(args: argparse.Namespace) -> int:
    """`scratchfs verify`: read everything through the mount; report corrupted files and blocks."""
    from scratchfs.verify import verify_tree

    path = args.mountpoint.absolute()
    entry = find_mount(path)
    if entry is None or entry.fstype != FSTYPE:
        raise MountError(EXIT_NOT_MOUNTED, f"{path} is not a scratchfs mount; give the mountpoint of a live scratchfs")
    return verify_tree(path, sys.stdout, progress_out=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `scratchfs` command."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        args.raw_argv = list(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        if args.command == "mount":
            return cmd_mount(args)
        if args.command == "umount":
            return cmd_umount(args)
        if args.command == "verify":
            return cmd_verify(args)
        if args.command == "volume":
            func = getattr(args, "func", None)
            if func is None:
                raise UsageError("volume needs a sub-command; see 'scratchfs volume --help'")
            code: int = func(args)
            return code
        raise UsageError(f"unknown command {args.command!r}")
    except UsageError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except MountError as e:
        print(f"{PROG}: cannot {argv[0] if argv else 'run'}: {e}", file=sys.stderr)
        return e.code
    except PermissionError as e:
        if debug:
            raise
        print(
            f"{PROG}: permission denied: {e.filename or e}; run as a user who may use it, or as root", file=sys.stderr
        )
        return EXIT_INTERNAL
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        if debug:
            raise
        logging.getLogger("scratchfs").debug("unexpected", exc_info=True)
        print(f"{PROG}: internal error ({type(e).__name__}); rerun with --debug for details", file=sys.stderr)
        return EXIT_INTERNAL
