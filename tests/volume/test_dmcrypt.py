"""The dmcrypt backend: command construction (always), a live cycle (only with device-mapper)."""

from __future__ import annotations

from pathlib import Path

import pytest

from scratchfs.volume import api, dmcrypt, ext4
from scratchfs.volume.errors import DeviceMapperMissingError
from tests.mounting import is_mounted
from tests.volume.conftest import Volumes


def test_open_command_reads_the_key_from_stdin_only() -> None:
    argv = dmcrypt.open_command(Path("/srv/vol.img"), "scratchfs-abc")
    assert argv == ["cryptsetup", "open", "--type", "luks2", "--key-file=-", "--",
                    "/srv/vol.img", "scratchfs-abc"]


def test_close_and_names() -> None:
    assert dmcrypt.close_command("scratchfs-abc") == ["cryptsetup", "close", "--", "scratchfs-abc"]
    name = dmcrypt.mapping_name(Path("/mnt/a"))
    assert name.startswith("scratchfs-") and len(name) == len("scratchfs-") + 16
    assert name == dmcrypt.mapping_name(Path("/mnt/a")) != dmcrypt.mapping_name(Path("/mnt/b"))
    assert dmcrypt.mapper_path(name) == f"/dev/mapper/{name}"


def test_filesystem_commands() -> None:
    assert ext4.mkfs_command("/dev/mapper/x") == [
        "mkfs.ext4", "-q", "-F", "-m", "0", "-L", "scratchfs", "-E", "nodiscard", "--", "/dev/mapper/x"]
    assert ext4.mount_command("/dev/mapper/x", Path("/srv/m")) == [
        "mount", "-t", "ext4", "-o", "nodev,nosuid,noatime", "/dev/mapper/x", "/srv/m"]


def test_auto_backend_follows_device_mapper() -> None:
    expected = "dmcrypt" if dmcrypt.available() else "userspace"
    assert api.pick_backend("auto") == expected
    assert api.pick_backend("userspace") == "userspace"
    with pytest.raises(ValueError):
        api.pick_backend("other")
    if not dmcrypt.available():
        with pytest.raises(DeviceMapperMissingError):
            api.pick_backend("dmcrypt")


@pytest.mark.skipif(
    not dmcrypt.available(),
    reason=f"device-mapper is not usable here ({dmcrypt.device_mapper_problem() or 'no cryptsetup'}): "
           "the live dmcrypt cycle needs /dev/mapper/control backed by the dm_mod kernel module",
)
def test_dmcrypt_volume_cycle_and_userspace_interop(vols: Volumes) -> None:
    key = vols.key()
    image = vols.path("dm.img")
    api.format_volume(image, 32 << 20, key, backend="dmcrypt", run_dir=vols.run_dir)
    mnt = vols.mountpoint("mnt")
    vol = api.open_volume(image, mnt, key, "dmcrypt", run_dir=vols.run_dir)
    vols.track(mnt)
    (mnt / "f").write_bytes(b"written by dm-crypt")
    vol.close()
    assert not is_mounted(mnt)
    # A volume written by one backend opens with the other.
    vol = vols.open(image, "mnt", key)
    assert (mnt / "f").read_bytes() == b"written by dm-crypt"
    vol.close()
