"""`rotate_passphrase`: the crash-safe keyslot move that split-key migration and rotation
use, resumed from each state a power cut can leave (checked by cryptsetup itself)."""

from __future__ import annotations

import pytest

from scratchfs.keyholder.wipe import wipe
from scratchfs.volume import api
from scratchfs.volume.errors import WrongKeyError
from scratchfs.volume.libcryptsetup import open_loaded
from tests.volume.conftest import Volumes, cryptsetup


def opens(image: object, key: bytes) -> bool:
    return cryptsetup("open", "--test-passphrase", str(image), key=key, check=False).returncode == 0


def test_fresh_rotation_adds_then_destroys(vols: Volumes) -> None:
    old, new = vols.key(), vols.key()
    image = vols.format("a.img", old)
    assert api.rotate_passphrase(image, old, new) == "rotated"
    assert opens(image, new) and not opens(image, old)
    assert len(api.dump_volume(image)["keyslots"]) == 1


def test_cut_after_the_new_keyslot_was_added_is_finished(vols: Volumes) -> None:
    old, new = vols.key(), vols.key()
    image = vols.format("b.img", old)
    # The state a power cut between add and destroy leaves: both passphrases open.
    with open_loaded(image) as dev:
        _slot, master = dev.master_key(old)
        dev.set_pbkdf(api.KEYSLOT_KDF)
        dev.add_keyslot(new, master)
        wipe(master)
    assert opens(image, old) and opens(image, new)
    assert api.rotate_passphrase(image, old, new) == "finished"
    assert opens(image, new) and not opens(image, old)
    assert len(api.dump_volume(image)["keyslots"]) == 1


def test_cut_after_the_old_keyslot_was_destroyed_is_done(vols: Volumes) -> None:
    old, new = vols.key(), vols.key()
    image = vols.format("c.img", old)
    api.change_passphrase(image, old, new)
    assert api.rotate_passphrase(image, old, new) == "done"
    assert opens(image, new)
    vol = vols.open(image, "mnt", new)  # the data segment still opens with the new key
    vol.close()


def test_neither_passphrase_opens_changes_nothing(vols: Volumes) -> None:
    image = vols.format("d.img", vols.key())
    before = image.read_bytes()[:65536]
    with pytest.raises(WrongKeyError):
        api.rotate_passphrase(image, vols.key(), vols.key())
    assert image.read_bytes()[:65536] == before
