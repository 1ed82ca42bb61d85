"""Loop devices: attach a file, detach, and find the devices that back a file.

The lookup reads /sys/block/loop*/loop/backing_file instead of asking losetup, because after
the FUSE server died the served file can no longer be stat()ed (ENOTCONN) but its loop device
must still be found and detached.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

from scratchfs.volume.errors import ToolError
from scratchfs.volume.system import run


def attach(path: Path) -> str:
    """Attach *path* to a free loop device and return the device path."""
    out = run(
        ["losetup", "--find", "--show", str(path)],
        what=f"attaching {path} to a loop device",
        hint="check that loop devices are available (/dev/loop-control)",
    )
    device = out.strip()
    if not device.startswith("/dev/loop"):
        raise ToolError(f"losetup printed an unexpected device name {device!r}; check util-linux")
    return device


def detach(device: str) -> None:
    """Detach loop *device* (no error if it is already gone)."""
    if not backing_file(device):
        return
    run(["losetup", "--detach", device], what=f"detaching {device}")


def backing_file(device: str) -> str | None:
    """The file behind loop *device*, or None if it is not attached."""
    name = os.path.basename(device)
    try:
        with open(f"/sys/block/{name}/loop/backing_file") as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def devices_for(path: Path | str) -> list[str]:
    """Every loop device whose backing file is *path* (or lies below it, for a directory)."""
    target = str(path).rstrip("/")
    found = []
    for entry in sorted(glob.glob("/sys/block/loop*/loop/backing_file")):
        with open(entry) as f:
            backing = f.read().strip()
        # The kernel appends " (deleted)" when the backing file was unlinked.
        backing = backing.removesuffix(" (deleted)")
        if backing == target or backing.startswith(target + "/"):
            found.append("/dev/" + entry.split("/")[3])
    return found
