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


# --- version 2: HPKE MLKEM768-X25519 ---------------------------------------------------


def test_v2_round_trip_binds_context_header_and_key() -> None:
    priv, pub = sealing.generate_hybrid_keypair()
    header = b'{"targets":["10.0.0.1"]}'
    blob = sealing.seal_v2(pub, b"secret-v2", b"credential", header)
    assert sealing.check_format(blob) == 2 and sealing.public_header(blob) == header
    assert b"secret-v2" not in blob
    assert sealing.open_any(b"\0" * 32, priv, blob, b"credential") == bytearray(b"secret-v2")
    assert sealing.hybrid_public_from_private(priv) == pub
    other, _ = sealing.generate_hybrid_keypair()
    for key, data, ctx in (
        (priv, blob, b"volume-key"),  # another purpose
        (other, blob, b"credential"),  # another appliance
        (priv, blob.replace(b"10.0.0.1", b"10.6.6.6"), b"credential"),  # public scope edited
        (priv, blob[:-1] + bytes([blob[-1] ^ 1]), b"credential"),  # ciphertext flipped
        (priv, blob[:10] + bytes([blob[10] ^ 1]) + blob[11:], b"credential"),  # header flipped
    ):
        with pytest.raises(sealing.SealError, match="does not open"):
            sealing.open_any(b"\0" * 32, key, data, ctx)
    # Two seals of the same plaintext share nothing (fresh encapsulation each time).
    again = sealing.seal_v2(pub, b"secret-v2", b"credential", header)
    assert again[-100:] != blob[-100:]


def test_v2_envelope_errors_are_clear() -> None:
    _, pub = sealing.generate_hybrid_keypair()
    blob = sealing.seal_v2(pub, b"x", b"credential")
    with pytest.raises(sealing.SealError, match="too short"):
        sealing.check_format(blob[:40])
    with pytest.raises(sealing.SealError, match="header length"):
        sealing.check_format(blob[:5] + b"\xff\xff" + blob[7:])
    with pytest.raises(sealing.SealError, match="upgrade this software"):
        sealing.check_format(b"SCSL\x07" + blob[5:])
    with pytest.raises(sealing.SealError, match="seal-key upgrade"):
        sealing.open_any(b"\0" * 32, None, blob, b"credential")
    with pytest.raises(sealing.SealError, match="seal-key upgrade"):
        sealing.open_sealed(b"\0" * 32, blob, b"credential")
    with pytest.raises(sealing.SealError, match="hybrid public key"):
        sealing.seal_v2(b"\0" * 10, b"x", b"credential")
    with pytest.raises(sealing.SealError, match="X25519"):
        sealing.load_hybrid_public_key(sealing.public_key_to_pem(sealing.generate_keypair()[1]))
    assert sealing.load_hybrid_public_key(sealing.hybrid_public_to_pem(pub)) == pub


def test_v1_and_v2_open_side_by_side() -> None:
    xpriv, xpub = sealing.generate_keypair()
    hpriv, hpub = sealing.generate_hybrid_keypair()
    v1 = sealing.seal_for(xpub, None, b"k1", b"volume-key")
    v2 = sealing.seal_for(xpub, hpub, b"k2", b"volume-key")
    assert (sealing.check_format(v1), sealing.check_format(v2)) == (1, 2)
    assert sealing.open_any(xpriv, hpriv, v1, b"volume-key") == bytearray(b"k1")
    assert sealing.open_any(xpriv, hpriv, v2, b"volume-key") == bytearray(b"k2")
