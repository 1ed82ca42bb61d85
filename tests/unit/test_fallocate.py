"""fallocate on the content engine over a real blob store (no mount), against a bytes model.

The mount tests (tests/fs/test_fallocate.py) compare with tmpfs; these reach what a mount on
ext4 cannot in a test's time: blocks in the overflow blob (a lowered store size limit), far
blocks in the version dict, and the backing store's state after a punch.
"""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest

from scratchfs import blocks
from scratchfs.content import FileContent
from scratchfs.errors import FsError
from scratchfs.fallocate import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    apply,
    check_request,
    check_space,
)
from scratchfs.store import MARKER_NAME, BlobStore

KEEP = FALLOC_FL_KEEP_SIZE
PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
ZERO = FALLOC_FL_ZERO_RANGE
MODES = [0, KEEP, PUNCH, ZERO, ZERO | KEEP]


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore.open(tmp_path)


def _falloc(c: FileContent, model: bytearray, mode: int, offset: int, length: int) -> None:
    check_request(mode, offset, length, 1 << 62)
    check_space(c, mode, offset, offset + length)
    apply(c, mode, offset, length)
    end = offset + length
    if not mode & KEEP and end > len(model):
        model.extend(bytes(end - len(model)))
    if mode & (FALLOC_FL_PUNCH_HOLE | ZERO):
        stop = min(end, len(model))
        if offset < stop:
            model[offset:stop] = bytes(stop - offset)


@pytest.mark.parametrize("overflow", [False, True], ids=["main-blob", "overflow-blob"])
@pytest.mark.parametrize("bs", [512, 4096])
def test_random_fallocates_match_model(store: BlobStore, bs: int, overflow: bool) -> None:
    if overflow:
        store.size_limit = 3 * (bs + blocks.OVERHEAD) + 5  # blocks from 3 on live in the overflow blob
    rng = random.Random(bs * 2 + overflow)
    c = FileContent(store, bs)
    model = bytearray()
    for _ in range(400):
        op = rng.random()
        off = rng.randrange(0, 8 * bs)
        if op < 0.45:
            data = rng.randbytes(rng.randrange(1, 2 * bs + 50))
            c.write(off, data)
            if off > len(model):
                model.extend(bytes(off - len(model)))
            model[off : off + len(data)] = data
        elif op < 0.55:
            size = rng.randrange(0, 8 * bs)
            c.truncate(size)
            del model[size:]
            model.extend(bytes(size - len(model)))
        else:
            _falloc(c, model, rng.choice(MODES), off, rng.randrange(1, 3 * bs + 7))
        assert c.size == len(model)
        assert c.read(0, len(model) + 1) == bytes(model)
    c.destroy()
    assert [p for p in os.listdir(store.root) if p != MARKER_NAME] == []


def test_punch_frees_blocks_and_backing_space(store: BlobStore) -> None:
    bs = 4096
    c = FileContent(store, bs)
    c.write(0, os.urandom(64 * bs))
    fd = c.ready()
    used = os.fstat(fd).st_blocks
    _falloc(c, bytearray(64 * bs), PUNCH, 1, 62 * bs)  # blocks 1..61 whole, 0 and 62 partial
    assert c.allocated == 3
    assert os.fstat(fd).st_blocks < used - 50 * bs // 512  # the records were punched out of the blob
    assert c.read(bs, 61 * bs) == bytes(61 * bs)
    c.destroy()


def test_punch_far_blocks_forgets_them(store: BlobStore) -> None:
    bs = 4096
    c = FileContent(store, bs)
    far = 1 << 30  # far past the dense array: the dict
    c.write(far * bs, b"x" * 10)
    c.write(0, b"y")
    assert c.far
    _falloc(c, bytearray(), PUNCH, far * bs, bs)
    assert not c.far
    assert c.read(far * bs, 10) == bytes(10)
    assert c.allocated == 1
    c.destroy()


@pytest.mark.parametrize(
    ("mode", "offset", "length", "code"),
    [
        (FALLOC_FL_PUNCH_HOLE, 0, 1, errno.EOPNOTSUPP),  # punch must keep the size
        (0x08, 0, 4096, errno.EOPNOTSUPP),  # collapse
        (0x40, 0, 4096, errno.EOPNOTSUPP),  # unshare
        (0, -1, 1, errno.EINVAL),
        (0, 0, 0, errno.EINVAL),
        (KEEP, 10, -1, errno.EINVAL),
        (0, 1000, 25, errno.EFBIG),
        (PUNCH, 1024, 1, errno.EFBIG),
    ],
)
def test_refused_requests(mode: int, offset: int, length: int, code: int) -> None:
    with pytest.raises(FsError) as e:
        check_request(mode, offset, length, 1024)
    assert e.value.errno == code


def test_enospc_from_backing_space_and_budget(store: BlobStore) -> None:
    bs = 4096
    c = FileContent(store, bs)
    c.write(0, b"a" * bs)
    real = store.statvfs()
    free = real.f_bavail * real.f_frsize
    with pytest.raises(FsError) as e:
        check_space(c, 0, 0, free + bs)
    assert e.value.errno == errno.ENOSPC
    check_space(c, PUNCH, 0, free + bs)  # a punch needs no space
    check_space(c, 0, 0, bs)  # the one written block needs none either
    c.budget.limit = c.budget.used  # the budget is spent
    with pytest.raises(FsError) as e:
        check_space(c, 0, bs, 3 * bs)  # two new version slots do not fit the budget
    assert e.value.errno == errno.ENOSPC
    c.destroy()
