"""Sealing secrets to an appliance: X25519 + HKDF-SHA256 + AES-256-GCM, versioned format.

Used for credentials (sealed by the customer with `scanner-seal`) and for the volume key
(sealed by the platform inside TLS, so it is encrypted twice on the wire). Pure module.

Format, version 1 (all lengths in bytes)::

    magic "SCSL" (4) | version 0x01 (1) | ephemeral X25519 public key (32) |
    nonce (12) | AES-256-GCM ciphertext with its 16-byte tag (len(plaintext) + 16)

Key derivation: ``shared = X25519(ephemeral_private, recipient_public)``;
``key = HKDF-SHA256(shared, salt = ephemeral_public || recipient_public,
info = b"scratchfs-seal/v1 " + context, length 32)``.
Associated data: ``magic || version || ephemeral_public || recipient_public ||
len(context) as 2 bytes big-endian || context``. So a blob cannot be re-targeted at another
recipient, another purpose (the caller's context label, e.g. b"credential" or b"volume-key")
or another format version without the tag check failing.

Every key is fresh per blob (a new ephemeral key pair each time), so the random nonce is
defence in depth, not a requirement. Error messages never contain key or plaintext bytes.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import struct
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAGIC: Final = b"SCSL"
VERSION: Final = 1
KEY_LEN: Final = 32
NONCE_LEN: Final = 12
TAG_LEN: Final = 16
HEADER_LEN: Final = len(MAGIC) + 1 + KEY_LEN + NONCE_LEN
MIN_SEALED_LEN: Final = HEADER_LEN + TAG_LEN
MAX_PLAINTEXT: Final = 1024 * 1024  # sealed secrets are small; refuse anything absurd
MAX_CONTEXT: Final = 255
_INFO_PREFIX: Final = b"scratchfs-seal/v1 "


class SealError(Exception):
    """Sealing or opening failed. The message never contains secret bytes."""


def generate_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as raw bytes: (private 32 bytes, public 32 bytes)."""
    priv = X25519PrivateKey.generate()
    return (
        priv.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        ),
        priv.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),
    )


def public_from_private(private: bytes) -> bytes:
    """The raw public key that belongs to a raw 32-byte X25519 private key."""
    _check_len(private, KEY_LEN, "private key")
    priv = X25519PrivateKey.from_private_bytes(bytes(private))
    return priv.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def _check_len(value: bytes | bytearray, expected: int, what: str) -> None:
    if len(value) != expected:
        raise SealError(f"{what} must be {expected} bytes, got {len(value)}")


def _check_context(context: bytes) -> None:
    if not context or len(context) > MAX_CONTEXT:
        raise SealError(f"context label must be 1-{MAX_CONTEXT} bytes")


def _derive(shared: bytes, eph_pub: bytes, recipient_pub: bytes, context: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_LEN,
        salt=eph_pub + recipient_pub,
        info=_INFO_PREFIX + context,
    ).derive(shared)


def _aad(eph_pub: bytes, recipient_pub: bytes, context: bytes) -> bytes:
    return (
        MAGIC
        + bytes([VERSION])
        + eph_pub
        + recipient_pub
        + struct.pack(">H", len(context))
        + (context)
    )


def seal(recipient_public: bytes, plaintext: bytes | bytearray, context: bytes) -> bytes:
    """Encrypt *plaintext* so that only the holder of *recipient_public*'s key can open it."""
    _check_len(recipient_public, KEY_LEN, "recipient public key")
    _check_context(context)
    if len(plaintext) > MAX_PLAINTEXT:
        raise SealError(f"plaintext larger than {MAX_PLAINTEXT} bytes")
    try:
        recipient = X25519PublicKey.from_public_bytes(bytes(recipient_public))
        eph = X25519PrivateKey.generate()
        eph_pub = eph.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        shared = eph.exchange(recipient)
    except ValueError:
        # OpenSSL refuses low-order points (all-zero shared secret).
        raise SealError("recipient public key is not a usable X25519 key") from None
    key = _derive(shared, eph_pub, bytes(recipient_public), context)
    nonce = os.urandom(NONCE_LEN)
    ct = AESGCM(key).encrypt(
        nonce, bytes(plaintext), _aad(eph_pub, bytes(recipient_public), context)
    )
    return MAGIC + bytes([VERSION]) + eph_pub + nonce + ct


def check_format(sealed: bytes) -> None:
    """Validate the envelope (magic, version, length) without any key; raise SealError.

    The platform uses this to refuse files that are not sealed blobs before storing them;
    it cannot check the recipient (that needs the appliance's private key).
    """
    if len(sealed) < MIN_SEALED_LEN:
        raise SealError(f"sealed blob too short ({len(sealed)} bytes, minimum {MIN_SEALED_LEN})")
    if sealed[: len(MAGIC)] != MAGIC:
        raise SealError("not a sealed blob (bad magic)")
    version = sealed[len(MAGIC)]
    if version != VERSION:
        raise SealError(f"unsupported sealed blob version {version} (supported: {VERSION})")
    if len(sealed) - MIN_SEALED_LEN > MAX_PLAINTEXT:
        raise SealError(f"sealed blob larger than {MAX_PLAINTEXT} bytes of plaintext")


def open_sealed(private: bytes | bytearray, sealed: bytes, context: bytes) -> bytearray:
    """Open a blob made by seal() for this private key and context; raise SealError.

    Returns a bytearray so that the caller can overwrite the plaintext after use.
    """
    _check_len(private, KEY_LEN, "private key")
    _check_context(context)
    check_format(sealed)
    off = len(MAGIC) + 1
    eph_pub = bytes(sealed[off : off + KEY_LEN])
    nonce = bytes(sealed[off + KEY_LEN : HEADER_LEN])
    ct = bytes(sealed[HEADER_LEN:])
    try:
        priv = X25519PrivateKey.from_private_bytes(bytes(private))
        my_pub = priv.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        shared = priv.exchange(X25519PublicKey.from_public_bytes(eph_pub))
    except ValueError:
        raise SealError("sealed blob carries an unusable ephemeral key") from None
    key = _derive(shared, eph_pub, my_pub, context)
    out = bytearray(len(ct) - TAG_LEN)
    try:
        # decrypt_into writes straight into our bytearray: no immutable plaintext copy.
        AESGCM(key).decrypt_into(nonce, ct, _aad(eph_pub, my_pub, context), out)
    except InvalidTag:
        raise SealError(
            "sealed blob does not open: tampered, sealed to another key, or for another purpose"
        ) from None
    return out


# --- public key files -------------------------------------------------------------------


def public_key_to_pem(public: bytes) -> bytes:
    """PEM (SubjectPublicKeyInfo) text for a raw X25519 public key."""
    _check_len(public, KEY_LEN, "public key")
    return X25519PublicKey.from_public_bytes(public).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_public_key(data: bytes) -> bytes:
    """Raw 32-byte X25519 public key from PEM, base64 text, or raw bytes; raise SealError."""
    stripped = data.strip()
    if stripped.startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(stripped)
        except ValueError:
            raise SealError("public key PEM does not parse") from None
        if not isinstance(key, X25519PublicKey):
            raise SealError("public key PEM is not an X25519 key")
        return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    if len(data) == KEY_LEN:
        return bytes(data)
    try:
        raw = base64.b64decode(stripped, validate=True)
    except (binascii.Error, ValueError):
        raise SealError("public key is neither PEM, base64 nor 32 raw bytes") from None
    _check_len(raw, KEY_LEN, "public key")
    return raw


def same_key(a: bytes, b: bytes) -> bool:
    """Constant-time equality for key material."""
    return hmac.compare_digest(a, b)
