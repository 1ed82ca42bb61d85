"""`dd bs=1M` streaming write and read of 1 GiB: scratchfs vs its raw backing directory, one run.

`python -m tools.bench.dd_compare [--size-mib N] [--rounds N] [--workdir DIR]` (root: drops caches).
Prints MB/s per target and the scratchfs/raw ratio; the scratchfs mount and its daemon are always
taken down.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SCRATCHFS = [sys.executable, "-m", "scratchfs"]


def _dd(args: list[str]) -> float:
    """Run dd and return its MB/s (parsed from its summary line)."""
    out = subprocess.run(["dd", *args], capture_output=True, text=True, check=True).stderr
    match = re.search(r"copied, ([0-9.]+) s", out)
    if not match:
        raise RuntimeError(f"cannot parse dd output: {out.strip()}")
    size = int(out.split(" bytes")[0].splitlines()[-1])
    return size / float(match.group(1)) / 1e6


def _drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def measure(directory: Path, size_mib: int) -> tuple[float, float]:
    """(write MB/s, read MB/s) for one file in *directory*."""
    target = directory / "dd.bin"
    _drop_caches()
    write = _dd(["if=/dev/zero", f"of={target}", "bs=1M", f"count={size_mib}", "conv=fsync"])
    _drop_caches()
    read = _dd([f"if={target}", "of=/dev/null", "bs=1M"])
    target.unlink()
    return write, read


def main() -> int:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="dd-compare-") as tmp:
        base = Path(tmp)
        raw, backing, mnt = base / "raw", base / "backing", base / "mnt"
        for d in (raw, backing, mnt):
            d.mkdir()
        subprocess.run([*SCRATCHFS, "mount", str(backing), str(mnt)], check=True)
        results: dict[str, list[tuple[float, float]]] = {"raw backing dir": [], "scratchfs": []}
        try:
            for _ in range(args.rounds):
                results["raw backing dir"].append(measure(raw, args.size_mib))
                results["scratchfs"].append(measure(mnt, args.size_mib))
        finally:
            subprocess.run([*SCRATCHFS, "umount", str(mnt)], check=False)
    medians = {k: (statistics.median(w for w, _ in v), statistics.median(r for _, r in v)) for k, v in results.items()}
    print(f"dd bs=1M, {args.size_mib} MiB, median of {args.rounds} rounds (MB/s)")
    print(f"{'target':<16} {'write':>8} {'read':>8}")
    for name, (w, r) in medians.items():
        print(f"{name:<16} {w:>8.0f} {r:>8.0f}")
    (rw, rr), (sw, sr) = medians["raw backing dir"], medians["scratchfs"]
    print(f"{'scratchfs/raw':<16} {sw / rw:>8.2f} {sr / rr:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
