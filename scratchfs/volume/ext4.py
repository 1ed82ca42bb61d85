"""The ext4 filesystem inside a volume: command lines for mkfs and mount (pure)."""

from __future__ import annotations

from pathlib import Path

# nodev/nosuid: the volume holds scan data, never device nodes or setuid programs.
MOUNT_OPTIONS = ("nodev", "nosuid", "noatime")


def mkfs_command(target: Path | str, label: str = "scratchfs") -> list[str]:
    """mkfs.ext4 for *target* (a block device or the served plaintext file).

    nodiscard: the served file and fresh dm-crypt devices need no discard at format time
    (and on the FUSE file it would only be refused). -m 0: no root reserve on a data volume.
    """
    return [
        "mkfs.ext4",
        "-q",
        "-F",
        "-m",
        "0",
        "-L",
        label,
        "-E",
        "nodiscard",
        "--",
        str(target),
    ]


def mount_command(device: str, mountpoint: Path | str, options: tuple[str, ...] = MOUNT_OPTIONS) -> list[str]:
    """mount the ext4 filesystem on *device* at *mountpoint*."""
    return ["mount", "-t", "ext4", "-o", ",".join(options), device, str(mountpoint)]
