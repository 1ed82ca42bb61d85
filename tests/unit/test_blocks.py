"""Block codec and layout arithmetic, without a mount."""

from __future__ import annotations

import pytest

from scratchfs import blocks
from scratchfs.crypto import FileKey
from scratchfs.errors import IntegrityError

BLOB = bytes(range(16))


def test_layout_arithmetic() -> None:
    bs = 4096
    assert blocks.record_offset(3, bs) == 3 * (bs + 28)
    assert blocks.block_length(0, 5000, bs) == 4096
    assert blocks.block_length(1, 5000, bs) == 904
    assert blocks.block_length(2, 5000, bs) == 0
    assert list(blocks.block_span(4095, 2, bs)) == [0, 1]
    assert list(blocks.block_span(0, 0, bs)) == []
    assert blocks.block_count(8193, bs) == 3


@pytest.mark.parametrize("size", [511, 3000, 1 << 21])
def test_block_size_validation(size: int) -> None:
    with pytest.raises(ValueError):
        blocks.check_block_size(size)


def test_round_trip() -> None:
    key = FileKey.new()
    rec = blocks.seal_record(key, BLOB, 5, 7, b"hello")
    assert len(rec) == 5 + blocks.OVERHEAD
    assert blocks.open_block(key, BLOB, 5, 7, rec, 5) == b"hello"


def test_every_binding_is_checked() -> None:
    key = FileKey.new()
    rec = blocks.seal_record(key, BLOB, 5, 7, b"x" * 100)
    cases = {
        "other index": (BLOB, 6, 7),
        "other version": (BLOB, 5, 8),
        "other blob": (bytes(16), 5, 7),
    }
    for _, (blob, index, version) in cases.items():
        with pytest.raises(IntegrityError):
            blocks.open_block(key, blob, index, version, rec, 100)
    with pytest.raises(IntegrityError):
        blocks.open_block(FileKey.new(), BLOB, 5, 7, rec, 100)
    with pytest.raises(IntegrityError):
        blocks.open_block(key, BLOB, 5, 7, rec[:-1], 100)
    with pytest.raises(IntegrityError):
        blocks.open_block(key, BLOB, 5, 7, rec + b"\0", 100)
    for pos in (0, 11, 12, 60, len(rec) - 1):
        bad = bytearray(rec)
        bad[pos] ^= 0x01
        with pytest.raises(IntegrityError) as exc:
            blocks.open_block(key, BLOB, 5, 7, bytes(bad), 100)
        assert exc.value.block == 5


def test_key_hygiene() -> None:
    key = FileKey.new()
    assert repr(key) == "<FileKey destroyed=False>"
    key.destroy()
    assert repr(key) == "<FileKey destroyed=True>"
    assert key.destroyed
    with pytest.raises(IntegrityError):
        key.seal(1, b"x", b"")
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(FileKey.new())


def test_nonce_counter_range() -> None:
    key = FileKey.new()
    with pytest.raises(ValueError):
        key.seal(0, b"x", b"")
