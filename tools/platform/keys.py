"""Key-encryption key (KEK) and keyslot-passphrase wrapping: AES-256-GCM, nothing else.

The platform stores each appliance's 256-bit keyslot passphrase (the key that unlocks the
appliance's LUKS2 keyslot; not the LUKS volume master key, which never leaves the appliance)
only wrapped under the KEK (a 0600 file in the state dir). Deleting the wrapped copy
crypto-shreds the appliance's disk. Wire and storage names predate this one and stay: the
wire's ``/v1/volume-key``, the column ``wrapped_volume_key`` and this module's associated
data label ``scratchfs-volume-key/v1`` (changing it would make every stored key unwrappable).
Format: version byte 0x01 | 12-byte nonce | ciphertext+tag. The associated data binds the
appliance id and name, so a wrapped key moved to another appliance's row does not unwrap.

Appliances on split volume keys (agent/volumekey.py) have no keyslot passphrase here, only
the platform's share of each key epoch: the same format under its own label
``scratchfs-volume-share/v1`` with the epoch bound too, so a share never unwraps as a
passphrase, nor as the share of another epoch or appliance.
"""

from __future__ import annotations

import os
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from scratchfs.keyholder.wipe import wipe

KEY_LEN: Final = 32
_NONCE_LEN: Final = 12
_VERSION: Final = b"\x01"


class WrapError(Exception):
    """A wrapped key does not unwrap (wrong KEK, tampered, or moved to another row)."""


def new_key() -> bytes:
    """A fresh random 256-bit key (the KEK, or a keyslot passphrase)."""
    return os.urandom(KEY_LEN)


def _aad(appliance_id: int, name: str) -> bytes:
    return b"scratchfs-volume-key/v1\x00" + str(appliance_id).encode() + b"\x00" + name.encode()


def _share_aad(appliance_id: int, name: str, epoch: int) -> bytes:
    return b"scratchfs-volume-share/v1\x00" + b"\x00".join(str(v).encode() for v in (appliance_id, name, epoch))


def _seal(kek: bytes, key: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(_NONCE_LEN)
    return _VERSION + nonce + AESGCM(kek).encrypt(nonce, key, aad)


def _open(kek: bytes, wrapped: bytes, aad: bytes, what: str) -> bytearray:
    if len(wrapped) != 1 + _NONCE_LEN + KEY_LEN + 16 or wrapped[:1] != _VERSION:
        raise WrapError(f"wrapped {what} has the wrong format")
    out = bytearray(KEY_LEN)
    try:
        AESGCM(kek).decrypt_into(wrapped[1 : 1 + _NONCE_LEN], wrapped[1 + _NONCE_LEN :], aad, out)
    except InvalidTag:
        raise WrapError(f"wrapped {what} does not unwrap under this KEK") from None
    return out


def wrap(kek: bytes, key: bytes, appliance_id: int, name: str) -> bytes:
    """Wrap *key* (a keyslot passphrase) under *kek* for one appliance row."""
    return _seal(kek, key, _aad(appliance_id, name))


def unwrap(kek: bytes, wrapped: bytes, appliance_id: int, name: str) -> bytearray:
    """Unwrap a key made by wrap(); returns a bytearray the caller overwrites after use."""
    return _open(kek, wrapped, _aad(appliance_id, name), "keyslot passphrase")


def wrap_share(kek: bytes, share: bytes, appliance_id: int, name: str, epoch: int) -> bytes:
    """Wrap the platform's volume-key share of *epoch* under *kek* for one appliance row."""
    return _seal(kek, share, _share_aad(appliance_id, name, epoch))


def unwrap_share(kek: bytes, wrapped: bytes, appliance_id: int, name: str, epoch: int) -> bytearray:
    """Unwrap a share made by wrap_share() for the same row and epoch; the caller wipes it."""
    return _open(kek, wrapped, _share_aad(appliance_id, name, epoch), "volume-key share")


def wrap_new(kek: bytes, appliance_id: int, name: str) -> bytes:
    """A fresh keyslot passphrase, wrapped by wrap(); the plaintext is wiped before returning."""
    passphrase = bytearray(new_key())
    try:
        return wrap(kek, bytes(passphrase), appliance_id, name)
    finally:
        wipe(passphrase)


def wrap_new_share(kek: bytes, appliance_id: int, name: str, epoch: int) -> bytes:
    """A fresh platform share of *epoch*, wrapped by wrap_share(); the plaintext is wiped."""
    share = bytearray(new_key())
    try:
        return wrap_share(kek, bytes(share), appliance_id, name, epoch)
    finally:
        wipe(share)
