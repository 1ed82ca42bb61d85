"""The dmcrypt backend: cryptsetup + device-mapper, what a real appliance uses.

The keyslot passphrase travels on cryptsetup's standard input (``--key-file=-``), never in an argument.
Command construction is pure and unit-tested; running it needs /dev/mapper/control.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from scratchfs.keyholder import mountinfo
from scratchfs.volume import ext4
from scratchfs.volume.errors import DeviceMapperMissingError
from scratchfs.volume.state import VolumeState, volume_id
from scratchfs.volume.system import run, umount

log = logging.getLogger(__name__)

DM_CONTROL = Path("/dev/mapper/control")


def device_mapper_problem() -> str | None:
    """Why device-mapper cannot be used here, or None if it can.

    The node alone proves nothing: libdevmapper (run by any cryptsetup command) creates
    /dev/mapper/control even when the kernel has no device-mapper, and opening it then
    fails with ENODEV. So we open it.
    """
    if not DM_CONTROL.exists():
        return f"{DM_CONTROL} is missing"
    try:
        fd = os.open(DM_CONTROL, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"{DM_CONTROL} cannot be opened ({e.strerror})"
    os.close(fd)
    return None


def available() -> bool:
    """True if device-mapper and cryptsetup are usable here."""
    return device_mapper_problem() is None and shutil.which("cryptsetup") is not None


def require() -> None:
    """Raise DeviceMapperMissingError unless the dmcrypt backend can run."""
    problem = device_mapper_problem()
    if problem:
        raise DeviceMapperMissingError(
            f"device-mapper is not available ({problem}); load the dm_crypt module or use --backend userspace"
        )
    if shutil.which("cryptsetup") is None:
        raise DeviceMapperMissingError("cryptsetup is not installed; install cryptsetup-bin")


def mapping_name(key: Path) -> str:
    """The device-mapper name used for a volume (derived from its mountpoint or image)."""
    return f"scratchfs-{volume_id(key)}"


def mapper_path(name: str) -> str:
    """/dev/mapper path of mapping *name*."""
    return f"/dev/mapper/{name}"


def open_command(image: Path, name: str) -> list[str]:
    """cryptsetup open, reading the keyslot passphrase (binary, no newline handling) from stdin."""
    return ["cryptsetup", "open", "--type", "luks2", "--key-file=-", "--", str(image), name]


def close_command(name: str) -> list[str]:
    """cryptsetup close."""
    return ["cryptsetup", "close", "--", name]


def activate(image: Path, name: str, passphrase: bytes | bytearray) -> str:
    """Map *image* to /dev/mapper/*name*; return the device path."""
    require()
    run(open_command(image, name), what=f"unlocking {image} with cryptsetup", stdin=passphrase)
    return mapper_path(name)


def deactivate(name: str) -> None:
    """Remove the mapping (no error if it is already gone)."""
    if os.path.exists(mapper_path(name)):
        run(close_command(name), what=f"closing mapping {name}")


def make_filesystem(image: Path, passphrase: bytes | bytearray) -> None:
    """Create ext4 inside a freshly formatted volume through device-mapper."""
    name = mapping_name(image)
    device = activate(image, name, passphrase)
    try:
        run(ext4.mkfs_command(device), what="creating ext4 in the volume")
    finally:
        deactivate(name)


def open_volume(image: Path, mountpoint: Path, passphrase: bytes | bytearray) -> VolumeState:
    """Unlock and mount; returns the state that close needs."""
    name = mapping_name(mountpoint)
    device = activate(image, name, passphrase)
    try:
        ext4.require_filesystem(device, image)
        run(ext4.mount_command(device, mountpoint), what=f"mounting the volume on {mountpoint}")
    except BaseException:
        deactivate(name)
        raise
    return VolumeState("dmcrypt", str(image), str(mountpoint), dm_name=name)


def close_volume(state: VolumeState) -> None:
    """Unmount and remove the mapping."""
    mnt = Path(state.mountpoint)
    src = mountinfo.find(mnt) if state.dm_name else None
    if src is not None and state.dm_name:
        if os.path.realpath(src.source) == os.path.realpath(mapper_path(state.dm_name)):
            umount(mnt, what=f"unmounting {mnt}")
    if state.dm_name:
        deactivate(state.dm_name)
