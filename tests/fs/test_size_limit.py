"""A write crossing a lowered --max-file-size, in every configuration (issue 23 item 5).

Without the writeback cache the daemon sees the write(2) itself: the write is short, up to the
limit, as POSIX asks, and the stored bytes read back. With the writeback cache (the agent's
configuration) write(2) only reaches the page cache and returns the full count; the daemon
sees the bytes at writeback, where a short count is ignored by the kernel, so the request must
fail: the writer gets EFBIG from fsync and EIO from close, and the bytes past the limit never
read back (EIO, never zeros, never a silently shorter file).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from agent.scratch import SCRATCHFS_OPTIONS
from scratchfs.profiles import effective_flags
from tests.fs.conftest import target_kind
from tests.fs.helpers import errno_name
from tests.mounting import Mounted, mount, unmount

LIMIT = 1 << 20
CONFIGS = {
    "default": [],
    "direct-io": ["--direct-io"],
    "writeback": ["--writeback-cache"],
    "agent": list(SCRATCHFS_OPTIONS),
}


@pytest.fixture(scope="module", params=list(CONFIGS), ids=list(CONFIGS))
def limited(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mounted]:
    if target_kind() != "scratchfs":
        pytest.skip("a lowered --max-file-size is a scratchfs option")
    base = tmp_path_factory.mktemp(f"limit-{request.param}")
    m = mount(base / "backing", base / "mnt", "--max-file-size", "1M", *CONFIGS[request.param])
    try:
        yield m
    finally:
        unmount(m)


@pytest.mark.parametrize("length", [8, 64 * 1024], ids=["8B", "64KiB"])
def test_crossing_write_succeeds_completely_or_fails_visibly(limited: Mounted, length: int) -> None:
    path = limited.mountpoint / f"cross-{length}"
    inside = 4 if length == 8 else length // 2
    offset = LIMIT - inside
    data = bytes((i * 7 + 1) % 251 for i in range(length))
    writeback = "--writeback-cache" in effective_flags(limited.options)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        written = os.pwrite(fd, data, offset)
        if not writeback:
            assert written == inside, "a crossing write is short, up to the limit"
            os.fsync(fd)
            assert os.fstat(fd).st_size == LIMIT
            assert os.pread(fd, length, offset) == data[:inside]
            assert errno_name(os.pwrite, fd, data[inside:], LIMIT) == "EFBIG"
        else:
            assert written == length  # the page cache took it all: the error must come later
            assert errno_name(os.fsync, fd) == "EFBIG"
            # Once the kernel drops its pages, a read spanning the limit returns the stored
            # part only (short, as at a bad sector), and a read of the lost range fails: never
            # zeros, whatever size the kernel reports.
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            assert os.pread(fd, length, offset) == data[:inside]
            assert errno_name(os.pread, fd, length, LIMIT) == "EIO"
            assert os.pread(fd, 4, 0) == b"\0\0\0\0", "the range before the crossing write is intact"
    finally:
        os.close(fd)  # the error was reported by fsync
    if writeback:
        assert "event=cached_write_refused" in limited.log_text()
        os.truncate(path, 0)  # the file is whole again once cut below the limit
        assert path.read_bytes() == b""


@pytest.mark.parametrize("length", [8, 64 * 1024], ids=["8B", "64KiB"])
def test_crossing_write_without_fsync_fails_at_close(limited: Mounted, length: int) -> None:
    path = limited.mountpoint / f"close-{length}"
    inside = 4 if length == 8 else length // 2
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        written = os.pwrite(fd, b"c" * length, LIMIT - inside)
    finally:
        closed = errno_name(os.close, fd)
    if "--writeback-cache" in effective_flags(limited.options):
        assert (written, closed) == (length, "EIO")
    else:
        assert (written, closed) == (inside, "ok")


def test_write_up_to_the_limit_is_whole(limited: Mounted) -> None:
    path = limited.mountpoint / "exact"
    data = b"e" * 4096
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        assert os.pwrite(fd, data, LIMIT - len(data)) == len(data)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.pread(fd, len(data), LIMIT - len(data)) == data
        assert os.fstat(fd).st_size == LIMIT
    finally:
        os.close(fd)
