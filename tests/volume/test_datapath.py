"""The userspace data path: the XTS sector codec and the served file, fuzzed against a model."""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scratchfs.keyholder.wipe import wipe
from scratchfs.volume import userspace
from scratchfs.volume.errors import BadImageError
from scratchfs.volume.libcryptsetup import CryptDevice, SegmentInfo, open_loaded
from scratchfs.volume.server import SegmentFile
from scratchfs.volume.xts import SectorCodec, UnsupportedCipherError, check_cipher, sector_span
from tests.volume.conftest import MiB, Volumes


def test_plain64_iv_counts_512_byte_units_even_for_4096_byte_sectors() -> None:
    codec = SectorCodec(os.urandom(64), 4096, iv_offset=0)
    assert codec.iv(0) == bytes(16)
    assert codec.iv(1) == (8).to_bytes(8, "little") + bytes(8)
    assert codec.iv(3) == (24).to_bytes(8, "little") + bytes(8)
    assert SectorCodec(os.urandom(64), 512, iv_offset=5).iv(2) == (7).to_bytes(16, "little")
    # plain64 keeps 64 bits; plain (legacy) wraps at 32.
    big = 1 << 33
    assert SectorCodec(os.urandom(64), 512).iv(big) == big.to_bytes(16, "little")
    assert SectorCodec(os.urandom(64), 512, iv_scheme="plain").iv(big) == bytes(16)


def test_codec_matches_one_xts_data_unit_per_sector() -> None:
    key = os.urandom(64)
    codec = SectorCodec(key, 4096, iv_offset=16)
    plain = os.urandom(3 * 4096)
    enc = codec.encrypt(10, plain)
    for i in range(3):
        iv = (16 + (10 + i) * 8).to_bytes(16, "little")
        ref = Cipher(algorithms.AES(key), modes.XTS(iv)).encryptor().update(plain[i * 4096:(i + 1) * 4096])
        assert enc[i * 4096:(i + 1) * 4096] == ref
    assert codec.decrypt(10, enc) == plain
    assert codec.decrypt(11, enc) != plain  # the position is part of the encryption
    with pytest.raises(ValueError):
        codec.encrypt(0, b"x" * 100)
    assert "key" not in repr(codec).lower() or "bytes" not in repr(codec)


def test_unsupported_ciphers_are_refused() -> None:
    assert check_cipher("aes", "xts-plain64", 64, 4096) == "plain64"
    for cipher, mode, ks, ss in [("serpent", "xts-plain64", 64, 512), ("aes", "cbc-essiv:sha256", 32, 512),
                                 ("aes", "xts-plain64", 48, 512), ("aes", "xts-plain64", 64, 8192)]:
        with pytest.raises(UnsupportedCipherError):
            check_cipher(cipher, mode, ks, ss)


@given(st.integers(0, 1 << 40), st.integers(0, 1 << 20), st.sampled_from([512, 4096]))
def test_sector_span_covers_exactly(offset: int, length: int, ss: int) -> None:
    first, count = sector_span(offset, length, ss)
    if length == 0:
        assert count == 0
    else:
        assert first * ss <= offset < (first + 1) * ss
        assert (first + count - 1) * ss <= offset + length - 1 < (first + count) * ss


@pytest.fixture(params=[512, 4096], ids=["s512", "s4096"])
def segment_file(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[SegmentFile, bytearray]]:
    """A SegmentFile on a plain file (no FUSE) and its plaintext model."""
    ss = request.param
    path = tmp_path / "seg.bin"
    size = 64 * ss
    path.write_bytes(os.urandom(size + 3 * ss))
    fd = os.open(path, os.O_RDWR)
    seg = SegmentFile(fd, SectorCodec(os.urandom(64), ss, iv_offset=7), 3 * ss, size)
    model = bytearray(seg.read(0, size))
    yield seg, model
    os.close(fd)


# The file and its model deliberately persist across examples: each one continues the history.
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_segment_file_matches_model(segment_file: tuple[SegmentFile, bytearray], data: st.DataObject) -> None:
    seg, model = segment_file
    size = seg.size
    for _ in range(data.draw(st.integers(1, 8))):
        off = data.draw(st.integers(0, size))
        length = data.draw(st.integers(0, min(3 * seg.ss + 7, size - off)))
        if data.draw(st.booleans()):
            payload = os.urandom(length)
            assert seg.write(off, payload) == length
            model[off:off + length] = payload
        else:
            assert seg.read(off, length) == bytes(model[off:off + length])
    assert seg.read(0, size) == bytes(model)
    with pytest.raises(OSError):
        seg.write(size - 1, b"ab")


def _header_only_image(path: Path, data_size: int, sector_size: int, key: bytes) -> None:
    """A LUKS2 header by libcryptsetup + a data segment of *data_size* bytes (no filesystem)."""
    with open(path, "wb") as f:
        f.truncate(MiB + data_size)
    with CryptDevice(path) as dev:
        dev.format_luks2(sector_size=sector_size)
        dev.add_keyslot(key)


@pytest.mark.parametrize("sector_size", [512, 4096])
def test_served_file_fuzzed_against_a_plaintext_model(vols: Volumes, sector_size: int) -> None:
    """Random reads/writes through the FUSE file, across sector boundaries, vs. a model."""
    rng = random.Random(sector_size)
    key = vols.key()
    image = vols.path("fz.img")
    size = 2 * MiB
    _header_only_image(image, size, sector_size, key)
    with open_loaded(image) as dev:
        seg = dev.segment()
        _slot, master_key = dev.master_key(key)
    work = vols.run_dir / "fuzz"
    work.mkdir(parents=True)
    server = userspace.start_server(image, seg, master_key, work / "fuse", work / "server.log")
    try:
        path = server.data_path
        assert path.stat().st_size == size
        fd = os.open(path, os.O_RDWR)
        try:
            model = bytearray(os.pread(fd, size, 0))
            assert len(model) == size
            for _ in range(250):
                off = rng.randrange(size)
                # Mostly small and unaligned, sometimes large (worker-thread path).
                length = rng.choice([1, 7, sector_size - 1, sector_size + 1, rng.randrange(1, 3 * sector_size),
                                     rng.randrange(64 * 1024, 300 * 1024)])
                length = min(length, size - off)
                if rng.random() < 0.5:
                    payload = os.urandom(length)
                    assert os.pwrite(fd, payload, off) == length
                    model[off:off + length] = payload
                else:
                    assert os.pread(fd, length, off) == bytes(model[off:off + length])
            # Concurrent writers on interleaved, unaligned ranges that share sectors.
            def writer(idx: int) -> None:
                wfd = os.open(path, os.O_RDWR)
                try:
                    for j in range(40):
                        o = (j * 4 + idx) * (sector_size // 2 + 3)
                        os.pwrite(wfd, bytes([idx + 1]) * (sector_size // 2 + 3), o)
                finally:
                    os.close(wfd)

            threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            chunk = sector_size // 2 + 3
            for j in range(40):
                for idx in range(4):
                    o = (j * 4 + idx) * chunk
                    model[o:o + chunk] = bytes([idx + 1]) * chunk
            assert os.pread(fd, size, 0) == bytes(model)
            assert os.pread(fd, 100, size) == b""  # end of the segment
            with pytest.raises(OSError):
                os.pwrite(fd, b"xx", size - 1)
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        userspace.stop_server(server.fuse_dir, server.pid, server.start_time)
        assert server.process is not None
        server.process.wait(timeout=10)
    # Persisted: a fresh server (new process) sees the same plaintext.
    server = userspace.start_server(image, seg, master_key, work / "fuse", work / "server.log")
    try:
        assert server.data_path.read_bytes() == bytes(model)
    finally:
        userspace.stop_server(server.fuse_dir, server.pid, server.start_time)
        assert server.process is not None
        server.process.wait(timeout=10)
        wipe(master_key)
    log = (work / "server.log").read_text()
    assert "Traceback" not in log and " ERROR " not in log
    os.rename(work, vols.root / "fuzz-done")  # keep the log, leave the run dir clean


def test_truncated_image_under_a_dynamic_segment_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.img"
    path.write_bytes(bytes(MiB))
    seg = SegmentInfo("aes", "xts-plain64", 64, 4096, MiB, 0, None)
    with pytest.raises(BadImageError):
        userspace.segment_size(path, seg)
