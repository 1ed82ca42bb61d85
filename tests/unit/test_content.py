"""The content engine over a real blob store in a temp dir (no mount), against a bytes model."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from scratchfs.content import FileContent
from scratchfs.errors import IntegrityError, StoreError
from scratchfs.store import MARKER_NAME, BlobStore, parse_marker


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore.open(tmp_path)


@pytest.mark.parametrize("bs", [512, 4096, 65536])
def test_random_ops_match_model(store: BlobStore, bs: int) -> None:
    rng = random.Random(bs)
    c = FileContent(store, bs)
    model = bytearray()
    for _ in range(300):
        op = rng.random()
        if op < 0.6:
            off = rng.randrange(0, 3 * bs + 100)
            data = rng.randbytes(rng.randrange(1, 2 * bs + 50))
            c.write(off, data)
            if off > len(model):
                model.extend(bytes(off - len(model)))
            model[off : off + len(data)] = data
        elif op < 0.8:
            size = rng.randrange(0, 4 * bs)
            c.truncate(size)
            if size < len(model):
                del model[size:]
            else:
                model.extend(bytes(size - len(model)))
        off = rng.randrange(0, 4 * bs)
        n = rng.randrange(0, 2 * bs)
        assert c.read(off, n) == bytes(model[off : off + n])
        assert c.size == len(model)
    c.destroy()
    assert [p for p in os.listdir(store.root) if p != MARKER_NAME] == []


def test_sparse_file_has_holes_not_ciphertext(store: BlobStore) -> None:
    c = FileContent(store, 4096)
    c.write(10 * 4096, b"end")
    assert c.read(0, 4096) == bytes(4096)
    assert c.allocated == 1
    assert c.st_blocks == 8


def test_tampered_blob_is_detected(store: BlobStore) -> None:
    c = FileContent(store, 4096)
    c.write(0, b"a" * 8192)
    assert c.blob_id is not None
    path = store.root / c.blob_id.hex()
    raw = bytearray(path.read_bytes())
    raw[100] ^= 1
    path.write_bytes(raw)
    with pytest.raises(IntegrityError) as e:
        c.read(0, 10)
    assert e.value.block == 0
    assert c.read(4096, 10) == b"a" * 10  # the other block is untouched
    with open(path, "ab") as f:
        f.write(b"x")
    with pytest.raises(IntegrityError):
        c.read(4096, 10)


def test_replay_of_old_block_is_detected(store: BlobStore) -> None:
    c = FileContent(store, 4096)
    c.write(0, b"old!" * 1024)
    assert c.blob_id is not None
    path = store.root / c.blob_id.hex()
    old = path.read_bytes()
    c.write(0, b"new!" * 1024)
    path.write_bytes(old)
    with pytest.raises(IntegrityError):
        c.read(0, 4)


def test_store_refuses_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match=r"notes\.txt"):
        BlobStore.open(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert not (tmp_path / MARKER_NAME).exists()


def test_store_wipes_leftovers(tmp_path: Path) -> None:
    BlobStore.open(tmp_path).close()
    (tmp_path / ("ab" * 16)).write_bytes(b"leftover")
    BlobStore.open(tmp_path).close()
    assert sorted(os.listdir(tmp_path)) == [MARKER_NAME]


@pytest.mark.parametrize("data", [b"", b"scratchfs-store v2\n", b"other v1\n", b"x" * 1000, b"scratchfs-store vX"])
def test_bad_markers(data: bytes) -> None:
    with pytest.raises(ValueError):
        parse_marker(data)
