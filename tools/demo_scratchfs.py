"""Show scratchfs on its own: mount, write, look at the backing store, read back, unmount.

`python -m tools.demo_scratchfs` — the first part of `make demo`; exit 0 only if every step held.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SCRATCHFS = [sys.executable, "-m", "scratchfs"]


def step(text: str) -> None:
    """Print one progress line."""
    print(f"[scratchfs demo] {text}", flush=True)


def run_demo(work: Path) -> int:
    """Run the demo inside *work*; returns the exit code."""
    backing, mnt = work / "backing", work / "mnt"
    backing.mkdir()
    mnt.mkdir()
    marker = "DEMO-MARKER-" + os.urandom(6).hex()
    step(f"mount scratchfs: backing={backing} mountpoint={mnt}")
    subprocess.run([*SCRATCHFS, "mount", str(backing), str(mnt), "--log-file", str(work / "daemon.log")], check=True)
    try:
        files = {
            f"targets-{marker}.txt": (marker + " 10.0.0.1 10.0.0.2\n").encode() * 100,
            f"raw/{marker}-responses.bin": os.urandom(3 * 1024 * 1024) + marker.encode(),
        }
        for name, data in files.items():
            path = mnt / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            step(f"wrote {name} ({len(data)} bytes)")
        step("backing store now holds:")
        found_marker = False
        for blob in sorted(backing.iterdir()):
            raw = blob.read_bytes()
            found_marker |= marker.encode() in raw
            print(f"    {blob.name}  {len(raw):>9} bytes  sha256={hashlib.sha256(raw).hexdigest()[:16]}…")
        if found_marker:
            step("FAIL: the plaintext marker is visible in the backing store")
            return 1
        step(f"no blob contains the marker {marker!r}, blob names are random ids, no file name appears")
        for name, data in files.items():
            if (mnt / name).read_bytes() != data:
                step(f"FAIL: {name} read back differently")
                return 1
        step("every file reads back byte for byte through the mount")
    finally:
        subprocess.run([*SCRATCHFS, "umount", str(mnt)], check=False)
    left = sorted(p.name for p in backing.iterdir())
    step(f"unmounted; backing store now holds: {left}")
    if left != [".scratchfs"]:
        step("FAIL: blobs survived the unmount")
        return 1
    step("OK: keys dropped and blobs removed at unmount")
    return 0


def main() -> int:
    """Entry point."""
    with tempfile.TemporaryDirectory(prefix="scratchfs-demo-") as tmp:
        return run_demo(Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
