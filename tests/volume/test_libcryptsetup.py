"""The libcryptsetup binding on plain image files (no device-mapper involved)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from scratchfs.volume.errors import BadImageError, ErasedError, ImageAccessError, WrongKeyError
from scratchfs.volume.libcryptsetup import CryptDevice, Pbkdf, open_loaded

MiB = 1024 * 1024


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "h.img"
    with open(p, "wb") as f:
        f.truncate(4 * MiB)
    return p


def test_format_load_and_getters(image: Path) -> None:
    key = os.urandom(32)
    with CryptDevice(image) as dev:
        dev.format_luks2(sector_size=4096, pbkdf=Pbkdf("pbkdf2", "sha256", 1000))
        assert dev.add_keyslot(key) == 0
    with open_loaded(image) as dev:
        seg = dev.segment()
        assert (seg.cipher, seg.cipher_mode, seg.master_key_size, seg.sector_size) == ("aes", "xts-plain64", 64, 4096)
        assert seg.data_offset == MiB and seg.iv_offset == 0 and seg.size is None
        assert dev.type() == "LUKS2"
        assert dev.active_keyslots() == [0]
        slot, master_key = dev.master_key(bytearray(key))
        assert slot == 0 and len(master_key) == 64 and any(master_key)
        meta = dev.dump_json()
        assert meta["keyslots"]["0"]["kdf"]["iterations"] == 1000
        assert "key" not in repr(dev).lower() or "h.img" in repr(dev)
        with pytest.raises(WrongKeyError):
            dev.master_key(os.urandom(32))
        # A second keyslot for the same volume key, then destroying the first.
        other = os.urandom(32)
        assert dev.add_keyslot(other, master_key) == 1
        dev.destroy_keyslot(0)
        assert dev.active_keyslots() == [1]
        assert bytes(dev.master_key(other)[1]) == bytes(master_key)
        dev.destroy_keyslot(1)
        with pytest.raises(ErasedError):
            dev.master_key(other)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageAccessError):
        CryptDevice(tmp_path / "missing.img")
    junk = tmp_path / "junk.img"
    junk.write_bytes(os.urandom(MiB))
    with pytest.raises(BadImageError) as e:
        open_loaded(junk)
    assert "\n" not in str(e.value)
