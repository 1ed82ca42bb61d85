"""Regular-file data semantics: reads, writes, open flags, truncate, holes, sparse, fallocate, mmap."""

from __future__ import annotations

import errno
import mmap
import os
import random
import time

import pytest

from tests.fs.conftest import Target
from tests.fs.helpers import read_all, write_all

GiB = 1 << 30


def test_create_write_read_roundtrip(fs: Target) -> None:
    p = fs.root / "f"
    data = os.urandom(3 * fs.block_size + 123)
    p.write_bytes(data)
    assert p.read_bytes() == data
    assert os.stat(p).st_size == len(data)


def test_empty_file(fs: Target) -> None:
    p = fs.root / "empty"
    p.touch()
    st = os.stat(p)
    assert st.st_size == 0
    assert st.st_blocks == 0
    assert p.read_bytes() == b""


def test_read_at_and_past_eof(fs: Target) -> None:
    p = fs.root / "f"
    p.write_bytes(b"0123456789")
    fd = os.open(p, os.O_RDONLY)
    try:
        assert os.pread(fd, 100, 5) == b"56789"
        assert os.pread(fd, 100, 10) == b""
        assert os.pread(fd, 100, 10_000_000) == b""
    finally:
        os.close(fd)


def test_overwrite_middle_keeps_rest(fs: Target) -> None:
    bs = fs.block_size
    p = fs.root / "f"
    base = bytes(random.Random(1).randbytes(3 * bs))
    p.write_bytes(base)
    fd = os.open(p, os.O_RDWR)
    try:
        write_all(fd, b"X" * 10, bs - 5)  # straddles a block boundary
    finally:
        os.close(fd)
    expect = base[: bs - 5] + b"X" * 10 + base[bs + 5 :]
    assert p.read_bytes() == expect


def test_o_excl(fs: Target) -> None:
    p = fs.root / "f"
    fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    os.close(fd)
    with pytest.raises(FileExistsError):
        os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    # O_EXCL does not follow symlinks, even dangling ones.
    os.symlink("nowhere", fs.root / "dangling")
    with pytest.raises(FileExistsError):
        os.open(fs.root / "dangling", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    assert not (fs.root / "nowhere").exists()
    os.mkdir(fs.root / "d")
    with pytest.raises(FileExistsError):
        os.open(fs.root / "d", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)


def test_o_creat_without_excl_opens_existing(fs: Target) -> None:
    p = fs.root / "f"
    p.write_bytes(b"keep")
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        assert os.read(fd, 10) == b"keep"
    finally:
        os.close(fd)


def test_o_trunc(fs: Target) -> None:
    p = fs.root / "f"
    p.write_bytes(b"a" * (2 * fs.block_size))
    fd = os.open(p, os.O_WRONLY | os.O_TRUNC)
    try:
        assert os.fstat(fd).st_size == 0
        os.write(fd, b"new")
    finally:
        os.close(fd)
    assert p.read_bytes() == b"new"


def test_o_append(fs: Target) -> None:
    p = fs.root / "f"
    p.write_bytes(b"start")
    a = os.open(p, os.O_WRONLY | os.O_APPEND)
    b = os.open(p, os.O_WRONLY | os.O_APPEND)
    plain = os.open(p, os.O_WRONLY)
    try:
        os.write(a, b"-a1")
        os.write(b, b"-b1")
        os.write(a, b"-a2")
        # Linux: pwrite on an O_APPEND descriptor appends, ignoring the offset.
        os.pwrite(b, b"-b2", 0)
        # A non-append descriptor writes where told, not at the end.
        os.pwrite(plain, b"S", 0)
    finally:
        for fd in (a, b, plain):
            os.close(fd)
    assert p.read_bytes() == b"Start-a1-b1-a2-b2"


def test_o_append_across_blocks(fs: Target) -> None:
    bs = fs.block_size
    p = fs.root / "f"
    expect = bytearray()
    fd = os.open(p, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
    try:
        rng = random.Random(7)
        for _ in range(12):
            chunk = rng.randbytes(rng.randrange(1, bs + 100))
            assert os.write(fd, chunk) == len(chunk)
            expect += chunk
            assert os.fstat(fd).st_size == len(expect)
    finally:
        os.close(fd)
    assert p.read_bytes() == bytes(expect)


def test_truncate_down_and_up(fs: Target) -> None:
    bs = fs.block_size
    p = fs.root / "f"
    data = random.Random(2).randbytes(3 * bs + 77)
    p.write_bytes(data)
    os.truncate(p, bs + 10)
    assert os.stat(p).st_size == bs + 10
    assert p.read_bytes() == data[: bs + 10]
    # Growing again must expose zeros, not the old bytes beyond the cut.
    os.truncate(p, 3 * bs)
    got = p.read_bytes()
    assert got == data[: bs + 10] + bytes(3 * bs - bs - 10)
    os.truncate(p, 0)
    assert p.read_bytes() == b""
    assert os.stat(p).st_size == 0


def test_truncate_within_block_then_extend_by_write(fs: Target) -> None:
    p = fs.root / "f"
    p.write_bytes(b"A" * 100)
    fd = os.open(p, os.O_RDWR)
    try:
        os.ftruncate(fd, 10)
        write_all(fd, b"Z", 99)
        assert os.fstat(fd).st_size == 100
        assert read_all(fd, 200, 0) == b"A" * 10 + bytes(89) + b"Z"
    finally:
        os.close(fd)


def test_ftruncate_on_open_handles(fs: Target) -> None:
    p = fs.root / "f"
    p.write_bytes(b"x" * 5000)
    r = os.open(p, os.O_RDONLY)
    w = os.open(p, os.O_RDWR)
    try:
        os.ftruncate(w, 3)
        assert os.fstat(r).st_size == 3
        assert os.pread(r, 100, 0) == b"xxx"
    finally:
        os.close(r)
        os.close(w)


def test_holes_read_as_zeros(fs: Target) -> None:
    bs = fs.block_size
    p = fs.root / "f"
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        write_all(fd, b"head", 0)
        write_all(fd, b"tail", 10 * bs + 3)
        assert os.fstat(fd).st_size == 10 * bs + 7
        got = read_all(fd, 10 * bs + 7, 0)
    finally:
        os.close(fd)
    assert got[:4] == b"head"
    assert got[4 : 10 * bs + 3] == bytes(10 * bs + 3 - 4)
    assert got[-4:] == b"tail"


def test_sparse_beyond_4gib(fs: Target) -> None:
    p = fs.root / "big"
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    end = 5 * GiB + 3
    try:
        write_all(fd, b"end", end)
        # A write straddling the 4 GiB line (32-bit offset wrap-around bugs).
        write_all(fd, b"ABCDEFGHIJ", 4 * GiB - 5)
        st = os.fstat(fd)
        assert st.st_size == end + 3
        assert os.pread(fd, 10, 4 * GiB - 5) == b"ABCDEFGHIJ"
        assert os.pread(fd, 8, 4 * GiB - 13) == bytes(8)
        assert os.pread(fd, 4096, 4 * GiB + 5) == bytes(4096)
        assert os.pread(fd, 100, end) == b"end"
        assert os.pread(fd, 10, end - 10) == bytes(10)
        # Offsets that alias 4 GiB-wrapped positions must stay zero.
        assert os.pread(fd, 10, 0) == bytes(10)
        assert os.pread(fd, 3, end - 4 * GiB) == bytes(3)
        # Sparse: far fewer blocks than the size suggests.
        assert st.st_blocks * 512 < 64 * 1024 * 1024
        os.ftruncate(fd, 4 * GiB + 2)
        assert os.fstat(fd).st_size == 4 * GiB + 2
        assert os.pread(fd, 100, 4 * GiB - 5) == b"ABCDEFG"
        assert os.pread(fd, 1, end) == b""
    finally:
        os.close(fd)


def test_posix_fallocate(fs: Target) -> None:
    bs = fs.block_size
    p = fs.root / "f"
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.posix_fallocate(fd, 0, 3 * bs + 5)
        assert os.fstat(fd).st_size == 3 * bs + 5
        assert read_all(fd, 4 * bs, 0) == bytes(3 * bs + 5)
        write_all(fd, b"data", bs - 2)
        # Allocating a range that is already inside the file changes neither size nor data.
        os.posix_fallocate(fd, 0, bs + 10)
        assert os.fstat(fd).st_size == 3 * bs + 5
        assert os.pread(fd, 4, bs - 2) == b"data"
        # Allocating past the end grows the file with zeros.
        os.posix_fallocate(fd, 5 * bs, 100)
        assert os.fstat(fd).st_size == 5 * bs + 100
        assert read_all(fd, 3 * bs, 3 * bs + 5) == bytes(2 * bs + 95)
        assert os.pread(fd, 4, bs - 2) == b"data"
    finally:
        os.close(fd)


def test_st_size_during_writes_and_blocks(fs: Target) -> None:
    bs = fs.block_size
    p = fs.root / "f"
    fd = os.open(p, os.O_CREAT | os.O_WRONLY, 0o644)
    total = 0
    try:
        for n in (1, 100, bs - 101, bs, 3, 2 * bs + 7):
            os.write(fd, b"q" * n)
            total += n
            # Seen through the path (another lookup) and through the descriptor, unflushed.
            assert os.stat(p).st_size == total
            assert os.fstat(fd).st_size == total
        if not fs.writeback:
            # With the writeback cache, dirty pages are the kernel's until flushed, and it keeps
            # its cached i_blocks meanwhile: st_blocks lags (documented for --writeback-cache).
            st = os.stat(p)
            assert st.st_blocks * 512 >= total
    finally:
        os.close(fd)
    assert os.stat(p).st_size == total
    if fs.writeback:
        os.sync()
        time.sleep(1.1)  # past the attribute timeout, so the kernel asks the daemon again
        assert os.stat(p).st_blocks * 512 >= total


def test_st_blocks_tracks_allocation(fs: Target) -> None:
    p = fs.root / "f"
    p.write_bytes(os.urandom(1 << 20))
    dense = os.stat(p).st_blocks
    assert dense * 512 >= 1 << 20
    os.truncate(p, 0)
    assert os.stat(p).st_blocks == 0
    os.truncate(p, 1 << 30)  # grow by a hole: nothing allocated
    assert os.stat(p).st_blocks * 512 < 1 << 20


def test_mmap_shared(fs: Target) -> None:
    bs = fs.block_size
    p = fs.root / "f"
    size = 3 * bs
    p.write_bytes(bytes(size))
    fd = os.open(p, os.O_RDWR)
    other = os.open(p, os.O_RDWR)
    try:
        with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
            m[bs - 3 : bs + 3] = b"mapped"
            m.flush()
            assert os.pread(other, 6, bs - 3) == b"mapped"
            write_all(other, b"viapwrite", 2 * bs)
            assert m[2 * bs : 2 * bs + 9] == b"viapwrite"
        os.fsync(fd)
    finally:
        os.close(fd)
        os.close(other)
    data = p.read_bytes()
    assert data[bs - 3 : bs + 3] == b"mapped"
    assert data[2 * bs : 2 * bs + 9] == b"viapwrite"
    assert len(data) == size


def test_mmap_private(fs: Target) -> None:
    p = fs.root / "f"
    p.write_bytes(b"original" + bytes(5000))
    fd = os.open(p, os.O_RDWR)
    try:
        with mmap.mmap(fd, 0, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE) as m:
            assert m[:8] == b"original"
            m[:8] = b"PRIVATE!"
            assert m[:8] == b"PRIVATE!"
            assert os.pread(fd, 8, 0) == b"original"
    finally:
        os.close(fd)
    assert p.read_bytes()[:8] == b"original"


def test_mmap_readonly_sees_file(fs: Target) -> None:
    p = fs.root / "f"
    data = random.Random(3).randbytes(2 * fs.block_size + 9)
    p.write_bytes(data)
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert m[:] == data


def test_write_to_readonly_fd_fails(fs: Target) -> None:
    p = fs.root / "f"
    p.write_bytes(b"x")
    fd = os.open(p, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as e:
            os.write(fd, b"y")
        assert e.value.errno == errno.EBADF
    finally:
        os.close(fd)


@pytest.mark.parametrize("seed", [11, 12])
def test_random_io_matches_model(fs: Target, seed: int) -> None:
    """Many random reads/writes/truncates across block boundaries, checked against bytes."""
    bs = fs.block_size
    rng = random.Random(seed)
    span = 5 * bs + 1000
    model = bytearray()
    p = fs.root / "f"
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        for step in range(300):
            op = rng.random()
            if op < 0.55:
                # Offsets cluster around block boundaries, where codecs go wrong.
                if rng.random() < 0.5:
                    off = rng.randrange(1, 6) * bs + rng.randrange(-20, 20)
                else:
                    off = rng.randrange(span)
                off = max(off, 0)
                data = rng.randbytes(rng.choice([1, 7, 100, bs - 1, bs, bs + 1, 2 * bs + 3]))
                write_all(fd, data, off)
                if len(model) < off:
                    model += bytes(off - len(model))
                model[off : off + len(data)] = data
            elif op < 0.65:
                size = rng.randrange(span)
                os.ftruncate(fd, size)
                if size < len(model):
                    del model[size:]
                else:
                    model += bytes(size - len(model))
            else:
                off = rng.randrange(span + bs)
                n = rng.choice([1, 10, bs, 2 * bs + 5, 4 * bs])
                got = os.pread(fd, n, off)
                assert got == bytes(model[off : off + n]), f"step {step}: read {n}@{off}"
            assert os.fstat(fd).st_size == len(model), f"step {step}"
        os.fsync(fd)
    finally:
        os.close(fd)
    assert p.read_bytes() == bytes(model)
