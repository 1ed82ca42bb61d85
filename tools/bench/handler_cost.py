"""``python -m tools.bench.handler_cost``: CPU cost of scratchfs's own request handlers, without FUSE.

The daemon's per-request cost is pyfuse3 + trio (the zerofs floor) plus our handler. On a busy
machine, end-to-end numbers cannot resolve a few microseconds; this calls the handlers of
`ScratchOps` directly inside one trio run (no kernel, no pyfuse3 session loop) over a blob
store in a temporary directory and reports CPU microseconds per call, best of several
repetitions. It measures exactly the part item 2 of issue 11 is about: our wrapper, locks,
attribute construction, clock calls, crypto and blob I/O.

Usage: ``python -m tools.bench.handler_cost [--calls N] [--repeat R] [--dir D]``.
"""

from __future__ import annotations

import argparse
import os
import random
import stat
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import cast

import pyfuse3
import trio

from scratchfs.fuse_ops import ScratchOps
from scratchfs.store import BlobStore
from scratchfs.tree import ROOT_INO

FILE_BYTES = 1 << 20
IO = 4096


class _MtimeOnly:
    """What a `touch -m -d` setattr carries: only the mtime changes."""

    update_size = update_mode = update_uid = update_gid = update_atime = update_ctime = False
    update_mtime = True


async def _measure(ops: ScratchOps, calls: int, repeat: int) -> dict[str, float]:
    ctx = pyfuse3.RequestContext()
    fi, attrs = await ops.create(ROOT_INO, b"data", stat.S_IFREG | 0o600, os.O_RDWR, ctx)
    fh, ino = fi.fh, attrs.st_ino
    await ops.write(fh, 0, os.urandom(FILE_BYTES))
    rng = random.Random(1)
    offsets = [rng.randrange(0, FILE_BYTES // IO) * IO for _ in range(calls)]
    buf = os.urandom(IO)
    # pyfuse3's SetattrFields is read-only from Python; setattr only reads these flags.
    fields = cast(pyfuse3.SetattrFields, _MtimeOnly())
    new_attr = pyfuse3.EntryAttributes()
    new_attr.st_mtime_ns = 10**18
    counter = iter(range(10**9))

    async def create_unlink() -> None:
        name = b"f%d" % next(counter)
        fi2, _ = await ops.create(ROOT_INO, name, stat.S_IFREG | 0o600, os.O_WRONLY, ctx)
        await ops.release(fi2.fh)
        await ops.unlink(ROOT_INO, name, ctx)

    cases: dict[str, Callable[[int], Awaitable[object]]] = {
        "getattr": lambda i: ops.getattr(ino, ctx),
        "lookup": lambda i: ops.lookup(ROOT_INO, b"data", ctx),
        "read 4 KiB": lambda i: ops.read(fh, offsets[i], IO),
        "write 4 KiB": lambda i: ops.write(fh, offsets[i], buf),
        "setattr mtime": lambda i: ops.setattr(ino, new_attr, fields, None, ctx),
        "create+release+unlink": lambda i: create_unlink(),
    }
    out: dict[str, float] = {}
    for name, call in cases.items():
        best = float("inf")
        for _ in range(repeat):
            t0 = time.process_time_ns()
            for i in range(calls):
                await call(i)
            best = min(best, (time.process_time_ns() - t0) / calls / 1000)
        out[name] = best
    # lookup() remembers the inode once per call, as the kernel's lookup count does.
    ops.ns.forget(ino, calls * repeat)
    await ops.release(fh)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools.bench.handler_cost", description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=5000, help="calls per repetition (default 5000)")
    p.add_argument("--repeat", type=int, default=5, help="repetitions; the best counts (default 5)")
    p.add_argument("--dir", type=Path, default=None, help="where the blob store goes (default: /dev/shm)")
    args = p.parse_args(argv)
    parent = args.dir or (Path("/dev/shm") if os.path.isdir("/dev/shm") else None)
    with tempfile.TemporaryDirectory(prefix="scratchfs-hcost-", dir=parent) as tmp:
        store = BlobStore.open(Path(tmp))
        ops = ScratchOps(store, 16384)
        try:
            result = trio.run(_measure, ops, args.calls, args.repeat)
        finally:
            ops.destroy_all()
            store.close()
    print(f"| handler | CPU µs per call (best of {args.repeat} x {args.calls}) |")
    print("|---|---:|")
    for name, us in result.items():
        print(f"| {name} | {us:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
