"""In-process cost of the content engine's hot path, no FUSE: µs per 4 KiB random write/read.

Measures `FileContent.write`/`read` on a 64 MiB file (16 KiB blocks, tmpfs backing) with 20,000
random 4 KiB-aligned offsets, best of 5 rounds. Used to check that the block version map (a
dense array for the contiguous prefix plus a dict for far blocks) costs the hot path nothing.
Compare two trees by running it with PYTHONPATH pointing at each:

    PYTHONPATH=/path/to/tree python tools/bench/content_micro.py
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from pathlib import Path

from scratchfs.content import FileContent
from scratchfs.store import BlobStore

FILE_SIZE = 64 << 20
OPS = 20_000
ROUNDS = 5


def measure() -> tuple[float, float]:
    """(write µs, read µs) per 4 KiB operation, best of ROUNDS."""
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        store = BlobStore.open(Path(d))
        content = FileContent(store, 16384)
        chunk = os.urandom(1 << 20)
        for off in range(0, FILE_SIZE, 1 << 20):
            content.write(off, chunk)
        rng = random.Random(1)
        offsets = [rng.randrange(0, FILE_SIZE - 4096) & ~4095 for _ in range(OPS)]
        data = os.urandom(4096)
        best_write = best_read = float("inf")
        for _ in range(ROUNDS):
            t = time.perf_counter()
            for off in offsets:
                content.write(off, data)
            best_write = min(best_write, (time.perf_counter() - t) / OPS * 1e6)
            t = time.perf_counter()
            for off in offsets:
                content.read(off, 4096)
            best_read = min(best_read, (time.perf_counter() - t) / OPS * 1e6)
        content.destroy()
        store.close()
    return best_write, best_read


if __name__ == "__main__":
    w, r = measure()
    print(f"write4k_us={w:.2f} read4k_us={r:.2f}")
