"""scratchfs stacked on an opened volume: the whole storage path, checked for plaintext leaks."""

from __future__ import annotations

import os

from scratchfs.keyholder.wipe import wipe
from scratchfs.volume import api
from scratchfs.volume.libcryptsetup import open_loaded
from scratchfs.volume.server import SegmentFile
from scratchfs.volume.xts import SectorCodec
from tests.mounting import mounted
from tests.volume.conftest import MiB, Volumes


def test_scratchfs_inside_a_volume_leaves_no_plaintext_in_the_image(vols: Volumes) -> None:
    key = vols.key()
    image = vols.format("stack.img", key, size=48 * MiB)
    marker = b"SCRATCHFS-MARKER-" + os.urandom(8).hex().encode()
    direct = b"EXT4-DIRECT-MARKER-" + os.urandom(8).hex().encode()
    vol = vols.open(image, "vol", key)
    backing = vol.mountpoint / "backing"
    with mounted(backing, vols.path("sfs")) as m:
        for i in range(5):
            (m.mountpoint / f"scan-{i}.txt").write_bytes(marker * (100 + i * 1000))
        (m.mountpoint / "sub").mkdir()
        (m.mountpoint / "sub" / "creds").write_bytes(marker)
        assert (m.mountpoint / "sub" / "creds").read_bytes() == marker
    # A control written to ext4 directly (below scratchfs) shows the search can find things.
    (vol.mountpoint / "control.txt").write_bytes(direct * 50)
    vol.close()

    raw = image.read_bytes()
    assert marker not in raw
    assert direct not in raw
    # Decrypting the volume (as an attacker with the platform key would) finds the ext4-level
    # control, but still not the scratchfs marker: that one was encrypted a second time.
    with open_loaded(image) as dev:
        seg = dev.segment()
        _slot, master_key = dev.master_key(key)
    fd = os.open(image, os.O_RDONLY)
    try:
        size = len(raw) - seg.data_offset
        codec = SectorCodec(master_key, seg.sector_size, seg.iv_offset)
        plain = SegmentFile(fd, codec, seg.data_offset, size).read(0, size)
    finally:
        os.close(fd)
        wipe(master_key)
    assert direct in plain
    assert marker not in plain
    assert api.dump_volume(image)["keyslots"]
