"""Sealing secrets to an appliance: HPKE (RFC 9180) with a hybrid post-quantum KEM, versioned.

Used for credentials (sealed by the customer with `scanner-seal`) and for the keyslot
passphrase (the wire's "volume key"; sealed by the platform inside TLS, so it is encrypted
twice on the wire). Pure module.

Format, version 2 (current; all lengths in bytes)::

    magic "SCSL" (4) | version 0x02 (1) | header length (2, big-endian) | header (public,
    e.g. a credential's scope as canonical JSON; empty for the keyslot passphrase) |
    HPKE enc (1120) | HPKE ciphertext with its 16-byte tag (len(plaintext) + 16)

HPKE suite: KEM MLKEM768-X25519 (ML-KEM-768 + X25519 hybrid: safe while either holds, so a
recorded blob stays safe against a future quantum adversary), KDF HKDF-SHA256, AEAD
AES-256-GCM, base mode, all through ``cryptography.hazmat.primitives.hpke``. The HPKE
``info`` binds the purpose and the public header::

    info = b"scratchfs-seal/v2" 0x00 | len(context) (1) | context |
           SHA-256(magic | version | header length | header)

so a blob cannot be replayed for another purpose, nor its public scope edited, without the
open failing. The recipient's hybrid key is 96 private bytes (ML-KEM-768 seed 64 | X25519
32) and 1216 public bytes (ML-KEM-768 1184 | X25519 32).

Format, version 1 (still opened, no longer produced for new appliances)::

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
import hashlib
import os
import struct
from typing import Final

from cryptography.exceptions import InternalError, InvalidTag
from cryptography.hazmat.primitives import hashes, hpke, serialization
from cryptography.hazmat.primitives.asymmetric import mlkem
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from scratchfs.keyholder.wipe import wipe

MAGIC: Final = b"SCSL"
VERSION: Final = 1  # the X25519 format; VERSION_2 is the hybrid HPKE format
VERSION_2: Final = 2
VERSIONS: Final = (VERSION, VERSION_2)
KEY_LEN: Final = 32
NONCE_LEN: Final = 12
TAG_LEN: Final = 16
HEADER_LEN: Final = len(MAGIC) + 1 + KEY_LEN + NONCE_LEN
MIN_SEALED_LEN: Final = HEADER_LEN + TAG_LEN
MAX_PLAINTEXT: Final = 1024 * 1024  # sealed secrets are small; refuse anything absurd
MAX_CONTEXT: Final = 255
_INFO_PREFIX: Final = b"scratchfs-seal/v1 "
_INFO_V2: Final = b"scratchfs-seal/v2\x00"
MLKEM_PUBLIC_LEN: Final = 1184
MLKEM_SEED_LEN: Final = 64
HYBRID_PUBLIC_LEN: Final = MLKEM_PUBLIC_LEN + KEY_LEN
HYBRID_PRIVATE_LEN: Final = MLKEM_SEED_LEN + KEY_LEN
HPKE_ENC_LEN: Final = 1120  # hpke.KEM.MLKEM768_X25519.enc_length()
MAX_HEADER: Final = 16 * 1024  # the public header (a scope) is small
_SUITE: Final = hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
_PEM_HYBRID: Final = b"SCRATCHFS MLKEM768X25519 PUBLIC KEY"


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


def check_format(sealed: bytes) -> int:
    """Validate the envelope (magic, version, lengths) without any key; return the version.

    The platform uses this to refuse files that are not sealed blobs before storing them;
    it cannot check the recipient (that needs the appliance's private key). Raise SealError.
    """
    if len(sealed) < len(MAGIC) + 1:
        raise SealError(f"sealed blob too short ({len(sealed)} bytes)")
    if sealed[: len(MAGIC)] != MAGIC:
        raise SealError("not a sealed blob (bad magic)")
    version = sealed[len(MAGIC)]
    if version == VERSION_2:
        header = public_header(sealed)
        body = len(sealed) - (len(MAGIC) + 3 + len(header))
        if body < HPKE_ENC_LEN + TAG_LEN:
            raise SealError("sealed blob (v2) too short for its HPKE encapsulation")
        if body - HPKE_ENC_LEN - TAG_LEN > MAX_PLAINTEXT:
            raise SealError(f"sealed blob larger than {MAX_PLAINTEXT} bytes of plaintext")
        return version
    if version != VERSION:
        raise SealError(
            f"unsupported sealed blob version {version} (supported: {VERSION}, {VERSION_2}); "
            "upgrade this software or re-seal with scanner-seal"
        )
    if len(sealed) < MIN_SEALED_LEN:
        raise SealError(f"sealed blob too short ({len(sealed)} bytes, minimum {MIN_SEALED_LEN})")
    if len(sealed) - MIN_SEALED_LEN > MAX_PLAINTEXT:
        raise SealError(f"sealed blob larger than {MAX_PLAINTEXT} bytes of plaintext")
    return version


def public_header(sealed: bytes) -> bytes:
    """The public header of a v2 blob (b"" for v1, which has none); raise SealError.

    Authenticated (bound into HPKE info) but readable by anyone: the platform reads a
    credential's scope from here. Only the copy inside the ciphertext is authoritative.
    """
    if len(sealed) < len(MAGIC) + 1 or sealed[: len(MAGIC)] != MAGIC:
        raise SealError("not a sealed blob (bad magic)")
    if sealed[len(MAGIC)] != VERSION_2:
        return b""
    off = len(MAGIC) + 1
    if len(sealed) < off + 2:
        raise SealError("sealed blob (v2) truncated in its header")
    (hlen,) = struct.unpack(">H", sealed[off : off + 2])
    if hlen > MAX_HEADER or len(sealed) < off + 2 + hlen:
        raise SealError("sealed blob (v2) header length is out of bounds")
    return bytes(sealed[off + 2 : off + 2 + hlen])


def open_sealed(private: bytes | bytearray, sealed: bytes, context: bytes) -> bytearray:
    """Open a blob made by seal() for this private key and context; raise SealError.

    Returns a bytearray so that the caller can overwrite the plaintext after use.
    """
    _check_len(private, KEY_LEN, "private key")
    _check_context(context)
    if check_format(sealed) != VERSION:
        raise SealError(
            "blob is sealed in format v2 (hybrid key); this appliance has no hybrid key: "
            "run 'scanner-agent seal-key upgrade STATE_DIR'"
        )
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


# --- version 2: HPKE with MLKEM768-X25519 ----------------------------------------------


def generate_hybrid_keypair() -> tuple[bytearray, bytes]:
    """A fresh hybrid key pair: (private 96 bytes in a bytearray, public 1216 bytes)."""
    seed = bytearray(os.urandom(MLKEM_SEED_LEN))
    x_priv, _ = generate_keypair()
    private = seed + bytearray(x_priv)
    wipe(seed)
    return private, hybrid_public_from_private(private)


def _hybrid_private(private: bytes | bytearray) -> hpke.MLKEM768X25519PrivateKey:
    _check_len(private, HYBRID_PRIVATE_LEN, "hybrid private key")
    try:
        return hpke.MLKEM768X25519PrivateKey(
            mlkem.MLKEM768PrivateKey.from_seed_bytes(private[:MLKEM_SEED_LEN]),
            X25519PrivateKey.from_private_bytes(bytes(private[MLKEM_SEED_LEN:])),
        )
    except ValueError:
        raise SealError("hybrid private key is not usable") from None


def _hybrid_public(public: bytes) -> hpke.MLKEM768X25519PublicKey:
    _check_len(public, HYBRID_PUBLIC_LEN, "hybrid public key")
    try:
        return hpke.MLKEM768X25519PublicKey(
            mlkem.MLKEM768PublicKey.from_public_bytes(public[:MLKEM_PUBLIC_LEN]),
            X25519PublicKey.from_public_bytes(public[MLKEM_PUBLIC_LEN:]),
        )
    except ValueError:
        raise SealError("hybrid public key is not a usable ML-KEM-768 + X25519 key") from None


def hybrid_public_from_private(private: bytes | bytearray) -> bytes:
    """The 1216-byte public key of a 96-byte hybrid private key."""
    _check_len(private, HYBRID_PRIVATE_LEN, "hybrid private key")
    try:
        m = mlkem.MLKEM768PrivateKey.from_seed_bytes(private[:MLKEM_SEED_LEN]).public_key()
    except ValueError:
        raise SealError("hybrid private key is not usable") from None
    return m.public_bytes_raw() + public_from_private(bytes(private[MLKEM_SEED_LEN:]))


def _info_v2(context: bytes, head: bytes) -> bytes:
    return _INFO_V2 + bytes([len(context)]) + context + hashlib.sha256(head).digest()


def seal_v2(
    recipient_public: bytes, plaintext: bytes | bytearray, context: bytes, header: bytes = b""
) -> bytes:
    """HPKE-seal *plaintext* to a hybrid public key, binding *context* and *header*."""
    _check_context(context)
    if len(plaintext) > MAX_PLAINTEXT:
        raise SealError(f"plaintext larger than {MAX_PLAINTEXT} bytes")
    if len(header) > MAX_HEADER:
        raise SealError(f"public header larger than {MAX_HEADER} bytes")
    key = _hybrid_public(bytes(recipient_public))
    head = MAGIC + bytes([VERSION_2]) + struct.pack(">H", len(header)) + header
    return head + _SUITE.encrypt(plaintext, key, info=_info_v2(context, head))


def _open_v2(private: bytes | bytearray, sealed: bytes, context: bytes) -> bytearray:
    header = public_header(sealed)
    split = len(MAGIC) + 3 + len(header)
    key = _hybrid_private(private)
    try:
        # HPKE returns immutable bytes: copied into our bytearray at once; the transient
        # copy is the same documented limit as the AESGCM object's key copy.
        plain = _SUITE.decrypt(sealed[split:], key, info=_info_v2(context, sealed[:split]))
    except (InvalidTag, ValueError, InternalError):
        raise SealError(
            "sealed blob does not open: tampered, sealed to another key, or for another purpose"
        ) from None
    return bytearray(plain)


def open_any(
    x25519_private: bytes | bytearray,
    hybrid_private: bytes | bytearray | None,
    sealed: bytes,
    context: bytes,
) -> bytearray:
    """Open a v1 blob with the X25519 key or a v2 blob with the hybrid key; raise SealError."""
    _check_context(context)
    if check_format(sealed) == VERSION:
        return open_sealed(x25519_private, sealed, context)
    if hybrid_private is None:
        raise SealError(
            "blob is sealed in format v2 (hybrid key) but this appliance has no hybrid key: "
            "run 'scanner-agent seal-key upgrade STATE_DIR'"
        )
    return _open_v2(hybrid_private, sealed, context)


def seal_for(
    x25519_public: bytes | None,
    hybrid_public: bytes | None,
    plaintext: bytes | bytearray,
    context: bytes,
) -> bytes:
    """Seal with the best format the recipient can open: v2 when it has a hybrid key."""
    if hybrid_public is not None:
        return seal_v2(hybrid_public, plaintext, context)
    if x25519_public is None:
        raise SealError("recipient has no sealing key")
    return seal(x25519_public, plaintext, context)


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


def hybrid_public_to_pem(public: bytes) -> bytes:
    """Armored base64 text for a hybrid public key (no standard PEM type exists for it)."""
    _check_len(public, HYBRID_PUBLIC_LEN, "hybrid public key")
    b64 = base64.b64encode(public)
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return b"\n".join([b"-----BEGIN " + _PEM_HYBRID + b"-----", *lines, b"-----END " + _PEM_HYBRID + b"-----", b""])


def load_hybrid_public_key(data: bytes) -> bytes:
    """Raw 1216-byte hybrid public key from its armored text or raw bytes; raise SealError."""
    stripped = data.strip()
    begin = b"-----BEGIN " + _PEM_HYBRID + b"-----"
    end = b"-----END " + _PEM_HYBRID + b"-----"
    if stripped.startswith(begin) and stripped.endswith(end):
        body = b"".join(stripped[len(begin) : -len(end)].split())
        try:
            raw = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise SealError("hybrid public key text is not base64") from None
    elif len(data) == HYBRID_PUBLIC_LEN:
        raw = bytes(data)
    elif stripped.startswith(b"-----BEGIN PUBLIC KEY-----") or len(data) == KEY_LEN:
        raise SealError(
            "this is the appliance's X25519 (v1) key; the appliance needs a hybrid key first "
            "('scanner-agent seal-key upgrade' on it)"
        )
    else:
        raise SealError("not a hybrid public key (ML-KEM-768 + X25519)")
    _hybrid_public(raw)  # refuse keys that do not parse, at the customer's side already
    return raw

