"""The two-share keyslot passphrase derivation (agent/volumekey.py)."""

from __future__ import annotations

import os

import pytest

from agent.volumekey import SHARE_SIZE, ShareError, derive_keyslot_passphrase


def test_both_shares_and_every_binding_matter() -> None:
    p, a = os.urandom(SHARE_SIZE), os.urandom(SHARE_SIZE)
    base = derive_keyslot_passphrase(p, a, "app-1", 1)
    assert len(base) == 32
    assert derive_keyslot_passphrase(bytearray(p), bytearray(a), "app-1", 1) == base
    others = [
        derive_keyslot_passphrase(os.urandom(SHARE_SIZE), a, "app-1", 1),  # platform share
        derive_keyslot_passphrase(p, os.urandom(SHARE_SIZE), "app-1", 1),  # appliance share
        derive_keyslot_passphrase(a, p, "app-1", 1),  # shares swapped
        derive_keyslot_passphrase(p, a, "app-2", 1),  # another appliance
        derive_keyslot_passphrase(p, a, "app-1", 2),  # another epoch
    ]
    assert all(o != base for o in others)
    assert base not in (bytearray(p), bytearray(a))


@pytest.mark.parametrize(("psize", "asize", "epoch"), [(31, 32, 1), (32, 33, 1), (32, 32, 0), (32, 32, 2**32)])
def test_bad_shares_and_epochs_are_refused_without_echoing_bytes(psize: int, asize: int, epoch: int) -> None:
    p, a = b"\x41" * psize, b"\x42" * asize
    with pytest.raises(ShareError) as info:
        derive_keyslot_passphrase(p, a, "app-1", epoch)
    assert "AAAA" not in str(info.value) and "BBBB" not in str(info.value)
