"""Key-encryption key (KEK) and keyslot-passphrase wrapping: AES-256-GCM, nothing else.

The platform stores each appliance's 256-bit keyslot passphrase (the key that unlocks the
appliance's LUKS2 keyslot; not the LUKS volume master key, which never leaves the appliance)
only wrapped under the KEK (a 0600 file in the state dir). Deleting the wrapped copy
crypto-shreds the appliance's disk. Wire and storage names predate this one and stay: the
wire's ``/v1/volume-key``, the column ``wrapped_volume_key`` and this module's associated
data label ``scratchfs-volume-key/v1`` (changing it would make every stored key unwrappable).
Format: version byte 0x01 | 12-byte nonce | ciphertext+tag. The associated data binds the
appliance id and name, so a wrapped key moved to another appliance's row does not unwrap.
"""

from __future__ import annotations

import os
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

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


def wrap(kek: bytes, key: bytes, appliance_id: int, name: str) -> bytes:
    """Wrap *key* (a keyslot passphrase) under *kek* for one appliance row."""
    nonce = os.urandom(_NONCE_LEN)
    return _VERSION + nonce + AESGCM(kek).encrypt(nonce, key, _aad(appliance_id, name))


def unwrap(kek: bytes, wrapped: bytes, appliance_id: int, name: str) -> bytearray:
    """Unwrap a key made by wrap(); returns a bytearray the caller overwrites after use."""
    if len(wrapped) != 1 + _NONCE_LEN + KEY_LEN + 16 or wrapped[:1] != _VERSION:
        raise WrapError("wrapped keyslot passphrase has the wrong format")
    out = bytearray(KEY_LEN)
    try:
        AESGCM(kek).decrypt_into(wrapped[1 : 1 + _NONCE_LEN], wrapped[1 + _NONCE_LEN :], _aad(appliance_id, name), out)
    except InvalidTag:
        raise WrapError("wrapped keyslot passphrase does not unwrap under this KEK") from None
    return out


