"""Split volume keys on the platform, both backends: the wire protocol (GET per scheme,
/next idempotent, /commit promotes and proves the replaced part gone), rotation and
deactivation through Storage, and the CLI's exit codes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from protocol import api, sealing
from protocol.client import PlatformError
from tests.platform.conftest import Platform, init_state, run_cli
from tests.platform.test_shred import activated, db_files_holding
from tools.platform import keys, state
from tools.platform.db.keyslots import WrapNewShare


def _wrap_new(kek: bytes) -> WrapNewShare:
    return lambda aid, name, epoch: keys.wrap_share(kek, keys.new_key(), aid, name, epoch)


async def test_migration_commit_rotation_and_deactivation(platform: Platform) -> None:
    a = await platform.activate("alpha")
    row = platform.storage.appliance("alpha")
    kek = platform.paths.kek.read_bytes()
    offer = await a.client.volume_key()
    assert (offer.scheme, offer.current.epoch, offer.pending) == (api.KEY_SCHEME_PASSPHRASE, 0, None)
    wrapped_passphrase = platform.storage.wrapped_keyslot_passphrase(row.id)
    assert wrapped_passphrase is not None

    first = await a.client.volume_key_next()
    again = await a.client.volume_key_next()  # idempotent: the same pending share
    share = sealing.open_sealed(a.x25519_private, first.sealed, api.SEAL_CONTEXT_VOLUME_SHARE)
    assert first.epoch == again.epoch == 1
    assert sealing.open_sealed(a.x25519_private, again.sealed, api.SEAL_CONTEXT_VOLUME_SHARE) == share
    with pytest.raises(sealing.SealError):  # a share never opens as a passphrase
        sealing.open_sealed(a.x25519_private, first.sealed, api.SEAL_CONTEXT_VOLUME_KEY)
    offer = await a.client.volume_key()
    assert offer.scheme == api.KEY_SCHEME_PASSPHRASE and offer.pending is not None and offer.pending.epoch == 1

    with pytest.raises(PlatformError) as e:
        await a.client.volume_key_commit(2)
    assert (e.value.status, e.value.reason) == (409, api.REASON_EPOCH_MISMATCH)
    assert await a.client.volume_key_commit(1) is True
    assert await a.client.volume_key_commit(1) is True  # repeated: a no-op
    offer = await a.client.volume_key()
    assert (offer.scheme, offer.current.epoch, offer.pending) == (api.KEY_SCHEME_SPLIT, 1, None)
    assert sealing.open_sealed(a.x25519_private, offer.current.sealed, api.SEAL_CONTEXT_VOLUME_SHARE) == share
    with pytest.raises(PlatformError):  # what the platform holds is no passphrase any more
        await a.client.keyslot_passphrase()
    assert platform.storage.wrapped_keyslot_passphrase(row.id) is None
    record = platform.storage.volume_key_record(row.id)
    assert record is not None and bytes(keys.unwrap_share(kek, record.wrapped, row.id, "alpha", 1)) == bytes(share)
    with pytest.raises(keys.WrapError):  # the epoch is bound: not a share of another epoch
        keys.unwrap_share(kek, record.wrapped, row.id, "alpha", 2)

    # The operator's rotation: a pending epoch 2, once.
    assert platform.storage.rotate_volume_key("alpha", time.time(), _wrap_new(kek)) == (2, True)
    assert platform.storage.rotate_volume_key("alpha", time.time(), _wrap_new(kek)) == (2, False)
    offer = await a.client.volume_key()
    assert offer.current.epoch == 1 and offer.pending is not None and offer.pending.epoch == 2
    assert platform.storage.key_states()[row.id].pending_epoch == 2

    # Deactivation destroys the current and the pending share, proven.
    platform.storage.deactivate("alpha", time.time())
    assert platform.storage.volume_key_record(row.id) is None
    assert platform.storage.key_states()[row.id].pending_epoch is None


def test_rotate_volume_key_cli(tmp_path: Path) -> None:
    paths = init_state(tmp_path / "st")
    storage = state.open_storage(paths)
    try:
        activated(storage, paths.kek.read_bytes(), "alpha")
        wrapped = storage.wrapped_keyslot_passphrase(storage.appliance("alpha").id)
        storage.add_appliance("waiting", b"h" * 32, time.time() + 60, time.time())
    finally:
        storage.close()
    assert wrapped is not None
    ok = run_cli("appliance", "rotate-volume-key", "alpha", state_dir=paths.root)
    assert ok.returncode == 0 and b"epoch 1 pending" in ok.stdout and b"next boot" in ok.stdout, ok.stderr
    again = run_cli("appliance", "rotate-volume-key", "alpha", state_dir=paths.root)
    assert again.returncode == 0 and b"pending already" in again.stdout
    listed = run_cli("appliance", "list", state_dir=paths.root).stdout.decode()
    assert "passphrase + 1 pending" in listed
    with state.open_storage(paths) as storage:
        record = storage.volume_key_record(storage.appliance("alpha").id)
    assert record is not None and record.wrapped_pending is not None
    missing = run_cli("appliance", "rotate-volume-key", "nosuch", state_dir=paths.root)
    assert missing.returncode == 3 and len(missing.stderr.decode().strip().splitlines()) == 1
    pending = run_cli("appliance", "rotate-volume-key", "waiting", state_dir=paths.root)
    assert pending.returncode == 4 and b"not active" in pending.stderr
    # Deactivation shreds the passphrase and the pending share, in every database file.
    assert run_cli("appliance", "deactivate", "alpha", state_dir=paths.root).returncode == 0
    assert db_files_holding(paths.root, wrapped[1:13]) == []
    assert db_files_holding(paths.root, record.wrapped_pending[1:13]) == []
    assert "destroyed" in run_cli("appliance", "list", state_dir=paths.root).stdout.decode()
