"""protocol.sealing: round trips, binding to key/context/version, tamper detection."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import sealing
from scratchfs.keyholder.wipe import wipe


def test_round_trip_and_fresh_blobs() -> None:
    priv, pub = sealing.generate_keypair()
    assert sealing.public_from_private(priv) == pub
    a = sealing.seal(pub, b"secret", b"credential")
    b = sealing.seal(pub, b"secret", b"credential")
    assert a != b  # new ephemeral key every time
    assert a[:5] == sealing.MAGIC + bytes([sealing.VERSION])
    assert len(a) == sealing.HEADER_LEN + len(b"secret") + sealing.TAG_LEN
    out = sealing.open_sealed(priv, a, b"credential")
    assert isinstance(out, bytearray) and out == b"secret"
    wipe(out)
    assert out == bytearray(6)


@settings(max_examples=30, deadline=None)
@given(st.binary(min_size=0, max_size=2000), st.binary(min_size=1, max_size=40))
def test_round_trip_property(plaintext: bytes, context: bytes) -> None:
    priv, pub = sealing.generate_keypair()
    assert sealing.open_sealed(priv, sealing.seal(pub, plaintext, context), context) == plaintext


def test_every_flipped_bit_is_detected() -> None:
    priv, pub = sealing.generate_keypair()
    blob = sealing.seal(pub, b"0123456789abcdef", b"credential")
    for i in range(len(blob)):
        for bit in (0, 7):
            bad = bytearray(blob)
            bad[i] ^= 1 << bit
            with pytest.raises(sealing.SealError) as ei:
                sealing.open_sealed(priv, bytes(bad), b"credential")
            assert "0123456789" not in str(ei.value)


def test_truncated_extended_wrong_key_wrong_context() -> None:
    priv, pub = sealing.generate_keypair()
    other_priv, _ = sealing.generate_keypair()
    blob = sealing.seal(pub, b"pw", b"credential")
    cases = [
        (priv, blob[:-1], b"credential"),
        (priv, blob + b"\x00", b"credential"),
        (priv, blob[: sealing.MIN_SEALED_LEN - 1], b"credential"),
        (other_priv, blob, b"credential"),
        (priv, blob, b"volume-key"),
        (priv, b"XXXX" + blob[4:], b"credential"),
        (priv, blob[:4] + b"\x02" + blob[5:], b"credential"),
    ]
    for key, data, ctx in cases:
        with pytest.raises(sealing.SealError):
            sealing.open_sealed(key, data, ctx)


def test_bad_keys_and_arguments() -> None:
    priv, pub = sealing.generate_keypair()
    with pytest.raises(sealing.SealError):
        sealing.seal(pub[:31], b"x", b"credential")
    with pytest.raises(sealing.SealError):
        sealing.seal(bytes(32), b"x", b"credential")  # low-order point: all-zero secret
    with pytest.raises(sealing.SealError):
        sealing.seal(pub, b"x", b"")
    with pytest.raises(sealing.SealError):
        sealing.seal(pub, b"x" * (sealing.MAX_PLAINTEXT + 1), b"credential")
    blob = sealing.seal(pub, b"x", b"credential")
    zero_eph = blob[:5] + bytes(32) + blob[37:]
    with pytest.raises(sealing.SealError):
        sealing.open_sealed(priv, zero_eph, b"credential")


def test_public_key_files() -> None:
    _, pub = sealing.generate_keypair()
    pem = sealing.public_key_to_pem(pub)
    assert pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    assert sealing.load_public_key(pem) == pub
    assert sealing.load_public_key(base64.b64encode(pub) + b"\n") == pub
    assert sealing.load_public_key(pub) == pub
    for junk in (
        b"nonsense",
        b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
        base64.b64encode(b"short"),
    ):
        with pytest.raises(sealing.SealError):
            sealing.load_public_key(junk)
