"""The ext4 filesystem inside a volume: command lines for mkfs and mount, and the check that
the decrypted device holds one at all (before mount(8) is asked, whose words we do not parse)."""

from __future__ import annotations

import os
from pathlib import Path

from scratchfs.volume.errors import BadImageError

# The ext2/3/4 superblock starts 1024 bytes in; s_magic (little-endian 0xEF53) is 0x38 into it.
SUPERBLOCK_OFFSET = 1024
MAGIC_OFFSET = SUPERBLOCK_OFFSET + 0x38
MAGIC = b"\x53\xef"

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


def has_superblock(head: bytes) -> bool:
    """True if *head* (the first bytes of a device) carries the ext2/3/4 superblock magic. Pure."""
    return head[MAGIC_OFFSET : MAGIC_OFFSET + len(MAGIC)] == MAGIC


def require_filesystem(device: str | Path, image: Path) -> None:
    """BadImageError (exit 11) unless the decrypted *device* of *image* holds an ext filesystem.

    Read here rather than inferred from mount(8)'s stderr: util-linux words its failure over
    several lines ("wrong fs type, bad option, bad superblock ..." then "dmesg(1) may have
    more information"), and a wrong key never gets this far (the keyslot digest checks it).
    """
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        head = os.pread(fd, MAGIC_OFFSET + len(MAGIC), 0)
    finally:
        os.close(fd)
    if not has_superblock(head):
        raise BadImageError(f"{image} holds no ext4 filesystem; format it with 'scratchfs volume format'")
