"""Process plumbing shared by the benchmark's own pyfuse3 filesystems (zerofs, passthrough).

Each of them runs in the foreground as its own process (pyfuse3 keeps global state: one
process serves one mount). The harness starts it, waits until the mount is live, and stops it
by unmounting (``fusermount3 -u``), then by PID (SIGTERM, SIGKILL) if it lingers. SIGTERM and
SIGINT make the daemon leave its main loop and unmount itself.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence

import pyfuse3
import trio

from scratchfs import request_loop
from scratchfs.keyholder import logformat, mountinfo
from tools.bench.exitcodes import EXIT_FAILED, EXIT_OK, EXIT_USAGE

log = logging.getLogger(__name__)


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """Arguments common to every benchmark filesystem daemon."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("backing", help="backing directory")
    p.add_argument("mountpoint", help="empty directory to mount on")
    p.add_argument(
        "--max-tasks", type=int, default=99,
        help="pyfuse3.main(max_tasks=...): most concurrent request-handling tasks (default 99)",
    )
    p.add_argument(
        "--writeback-cache", action="store_true",
        help="ask the kernel for the FUSE writeback cache (writes are buffered in the page cache)",
    )
    p.add_argument(
        "--direct-io", action="store_true",
        help="open every file with FOPEN_DIRECT_IO (no page cache; every read/write is a request)",
    )
    p.add_argument(
        "--attr-timeout", type=float, default=1.0,
        help="seconds the kernel may cache attributes and names (default 1, as gocryptfs)",
    )
    p.add_argument(
        "--spin-us", type=int, default=None,
        help="request-loop spin before sleeping, as scratchfs's (default: scratchfs's default, so "
        "the floor waits for requests as scratchfs does)",
    )
    p.add_argument("--pid-file", help="write the daemon's PID here once the mount is live")
    p.add_argument("--log-file", help="log here instead of stderr")
    p.add_argument("--debug", action="store_true", help="debug logging and tracebacks")
    return p


def setup_logging(log_file: str | None, debug: bool) -> None:
    """key=value style logging to a file or stderr."""
    handler: logging.Handler = (
        logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    )
    logformat.setup(logging.DEBUG if debug else logging.INFO, handler)


async def _serve(max_tasks: int, loop_kwargs: dict[str, int]) -> None:
    """Run pyfuse3's loop until unmounted, or until SIGTERM/SIGINT asks us to stop."""
    async with trio.open_nursery() as nursery:

        async def watch_signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("event=signal signum=%d action=terminate", signum)
                    pyfuse3.terminate()
                    return

        nursery.start_soon(watch_signals)
        await pyfuse3.main(max_tasks=max_tasks, **loop_kwargs)
        # pyfuse3.main returns on unmount or terminate(); the signal watcher is no longer needed.
        nursery.cancel_scope.cancel()


def serve(
    ops: pyfuse3.Operations,
    args: argparse.Namespace,
    fsname: str,
    prog: str,
) -> int:
    """Mount *ops* on args.mountpoint, serve until unmounted or signalled, and return an exit code."""
    try:
        loop_kwargs = request_loop.main_kwargs(args.spin_us)
    except ValueError as e:
        print(f"{prog}: --spin-us: {e}", file=sys.stderr)
        return EXIT_USAGE
    options = set(pyfuse3.default_options)
    options.add(f"fsname={fsname}")
    try:
        pyfuse3.init(ops, args.mountpoint, options)
    except RuntimeError as e:
        print(f"{prog}: cannot mount on {args.mountpoint}: {e}; check the directory exists "
              "and nothing is mounted there", file=sys.stderr)
        return EXIT_FAILED
    if args.pid_file:
        with open(args.pid_file, "w") as f:
            f.write(f"{os.getpid()}\n")
    log.info("event=mounted mountpoint=%s max_tasks=%d writeback_cache=%s direct_io=%s spin_us=%s",
             args.mountpoint, args.max_tasks, args.writeback_cache, args.direct_io, args.spin_us)
    unmount = True
    try:
        trio.run(_serve, args.max_tasks, loop_kwargs)
    except BaseException:
        # A crash must not leave a half-dead mount behind: still unmount below.
        log.exception("event=crash")
        pyfuse3.close(unmount=True)
        raise
    else:
        # If fusermount3 -u already took the mount down, closing must not try again.
        unmount = _still_mounted(args.mountpoint)
        pyfuse3.close(unmount=unmount)
    log.info("event=stopped mountpoint=%s", args.mountpoint)
    return EXIT_OK


def _still_mounted(mountpoint: str) -> bool:
    return mountinfo.find(mountpoint) is not None


def run_main(
    argv: Sequence[str] | None,
    prog: str,
    description: str,
    make_ops: Callable[[argparse.Namespace], pyfuse3.Operations],
) -> int:
    """Parse arguments, build the Operations, mount and serve. Returns the exit code."""
    args = build_parser(prog, description).parse_args(argv)
    setup_logging(args.log_file, args.debug)
    if not os.path.isdir(args.backing):
        print(f"{prog}: backing directory {args.backing} does not exist; create it first",
              file=sys.stderr)
        return EXIT_USAGE
    if not os.path.isdir(args.mountpoint):
        print(f"{prog}: mount point {args.mountpoint} does not exist; create it first",
              file=sys.stderr)
        return EXIT_USAGE
    ops = make_ops(args)
    try:
        return serve(ops, args, fsname=prog, prog=prog)
    except Exception as e:  # one line on stderr, traceback only with --debug
        if args.debug:
            raise
        print(f"{prog}: daemon failed: {type(e).__name__}: {e}; rerun with --debug",
              file=sys.stderr)
        return EXIT_FAILED
