"""Throughput of the userspace volume engine: streaming write/read through ext4 in a volume,
against the same streaming on a plain file next to the image; 4096- vs 512-byte sectors.

Run as root:  .venv/bin/python -m tools.bench.volume_bench [--size-mib 128] [--dir /var/tmp]

Writes are timed up to and including fsync; before each read the file's pages are dropped with
posix_fadvise(DONTNEED) (per file, nothing global), so reads go through the whole stack.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from scratchfs.volume import api

CHUNK = 1024 * 1024


def stream_write(path: Path, size: int) -> float:
    """MiB/s of writing *size* bytes sequentially in 1 MiB chunks, fsync included."""
    block = os.urandom(CHUNK)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        t0 = time.perf_counter()
        for _ in range(size // CHUNK):
            os.write(fd, block)
        os.fsync(fd)
        dt = time.perf_counter() - t0
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return size / CHUNK / dt


def stream_read(path: Path) -> float:
    """MiB/s of reading the whole file sequentially from cold (its pages dropped first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        total = 0
        t0 = time.perf_counter()
        while chunk := os.read(fd, CHUNK):
            total += len(chunk)
        dt = time.perf_counter() - t0
    finally:
        os.close(fd)
    return total / CHUNK / dt


def bench_volume(work: Path, size: int, sector_size: int, rounds: int) -> tuple[float, float]:
    key = os.urandom(32)
    image = work / f"bench-{sector_size}.img"
    mnt = work / f"mnt-{sector_size}"
    mnt.mkdir()
    run_dir = work / "run"
    # Room for the file, ext4 metadata and the journal.
    api.format_volume(image, size + size // 2 + 64 * CHUNK, key, backend="userspace",
                      sector_size=sector_size, run_dir=run_dir)
    vol = api.open_volume(image, mnt, key, "userspace", run_dir=run_dir)
    try:
        writes, reads = [], []
        for _ in range(rounds):
            writes.append(stream_write(mnt / "stream.bin", size))
            reads.append(stream_read(mnt / "stream.bin"))
        return max(writes), max(reads)
    finally:
        vol.close()
        image.unlink()


def bench_raw(work: Path, size: int, rounds: int) -> tuple[float, float]:
    path = work / "raw.bin"
    writes, reads = [], []
    for _ in range(rounds):
        writes.append(stream_write(path, size))
        reads.append(stream_read(path))
    path.unlink()
    return max(writes), max(reads)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mib", type=int, default=128, help="file size streamed (default 128)")
    p.add_argument("--rounds", type=int, default=2, help="best of N rounds (default 2)")
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()),
                   help="where the image and the raw file live")
    args = p.parse_args(argv)
    size = args.size_mib * CHUNK
    work = Path(tempfile.mkdtemp(prefix="volume-bench-", dir=args.dir))
    try:
        rows = [("raw file (same fs as the image)", *bench_raw(work, size, args.rounds))]
        for ss in (4096, 512):
            rows.append((f"ext4 in volume, {ss}-byte sectors", *bench_volume(work, size, ss, args.rounds)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    raw_w, raw_r = rows[0][1], rows[0][2]
    print(f"streaming {args.size_mib} MiB in 1 MiB requests, best of {args.rounds}, {os.cpu_count()} CPUs")
    print(f"{'path':38} {'write MiB/s':>12} {'read MiB/s':>12} {'write':>7} {'read':>7}")
    for name, w, r in rows:
        print(f"{name:38} {w:12.1f} {r:12.1f} {w / raw_w:6.2f}x {r / raw_r:6.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
