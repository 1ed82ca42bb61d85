"""Bugs external suites found in non-default modes (issue 11 item 4a, 4b).

- The file size limit. By default it is the kernel's own (2^63 - 1, FUSE's fixed s_maxbytes),
  which scratchfs can store on any backing filesystem (overflow blobs past ext4's 16 TiB), so
  the kernel refuses an oversized write at write(2) in every mode, writeback cache included.
  A lower --max-file-size is enforced at write(2)/truncate(2) wherever the daemon sees the
  call; with the writeback cache (FUSE offers no way to tell the kernel a lower limit, so it
  accepts the bytes into its page cache) the writer gets the error at fsync/close and the lost
  bytes never read back as zeros.
- Under --direct-io, a write by an unprivileged process clears setuid/setgid (pjdfstest
  chmod/12.t), as the kernel does itself for page-cache writes.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fs.helpers import errno_name, run_as
from tests.mounting import Mounted, mount, unmount

LIMIT = 1 << 20


@pytest.fixture(params=[[], ["--direct-io"], ["--writeback-cache"]], ids=["default", "direct-io", "writeback-cache"])
def limited(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Mounted]:
    m = mount(tmp_path / "backing", tmp_path / "mnt", "--max-file-size", "1M", "--allow-other", *request.param)
    try:
        yield m
    finally:
        unmount(m)


def test_file_size_limit(limited: Mounted) -> None:
    path = limited.mountpoint / "f"
    path.write_bytes(b"kept")
    assert errno_name(os.truncate, path, LIMIT + 1) == "EFBIG"
    os.truncate(path, LIMIT)  # exactly the limit is allowed
    os.truncate(path, 4)
    writeback = "--writeback-cache" in limited.options
    fd = os.open(path, os.O_RDWR)
    try:
        if not writeback:
            assert errno_name(os.pwrite, fd, b"x", LIMIT) == "EFBIG"
            assert errno_name(os.pwrite, fd, b"x", 1 << 62) == "EFBIG"
            assert os.pwrite(fd, b"abcdef", LIMIT - 2) == 2  # short write up to the limit
            assert os.pread(fd, 2, LIMIT - 2) == b"ab"
        else:
            # The kernel takes the byte into its page cache (FUSE cannot report s_maxbytes)...
            assert os.pwrite(fd, b"x", LIMIT + 4096) == 1
            # ...and the writer learns at fsync; the byte never reads back as a zero.
            assert errno_name(os.fsync, fd) == "EFBIG"
            # While the kernel keeps the page it serves the byte itself; once the page is
            # dropped, the read reaches the daemon, which refuses rather than answer zeros.
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            assert errno_name(os.pread, fd, 1, LIMIT + 4096) == "EIO"
            assert "event=cached_write_refused" in limited.log_text()
            os.ftruncate(fd, 4)  # truncating clears the mark: the file is whole again
            assert os.pread(fd, 10, 0) == b"kept"
    finally:
        os.close(fd)
    assert path.read_bytes()[:4] == b"kept"


MODES = [[], ["--direct-io"], ["--writeback-cache"]]


@pytest.mark.parametrize("options", MODES, ids=["default", "direct-io", "writeback-cache"])
def test_default_limit_is_the_kernels(tmp_path: Path, options: list[str]) -> None:
    """Past the ext4 backing's 16 TiB a byte still lands (overflow blob), up to the last byte the
    kernel allows; past it the kernel itself refuses at write(2), before any page cache."""
    m = mount(tmp_path / "backing", tmp_path / "mnt", *options)
    try:
        path = m.mountpoint / "edge"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.pwrite(fd, b"first", 0)
            for off in (1 << 45, (1 << 63) - 2):
                assert os.pwrite(fd, b"Z", off) == 1
            # The kernel refuses the last offset itself, as for tmpfs (pos + count would pass 2^63).
            assert errno_name(os.pwrite, fd, b"Z", (1 << 63) - 1) == "EINVAL"
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # read back from the daemon
            assert os.pread(fd, 2, (1 << 45) - 1) == b"\0Z"
            assert os.pread(fd, 3, (1 << 63) - 4) == b"\0\0Z"
            assert os.pread(fd, 5, 0) == b"first"
            assert os.fstat(fd).st_size == (1 << 63) - 1
        finally:
            os.close(fd)
        assert len(m.blobs()) == 2, "the main blob and one overflow blob"
        assert "event=cached_write_refused" not in m.log_text()
    finally:
        unmount(m)


def test_writeback_writer_sees_the_error_at_close(tmp_path: Path) -> None:
    m = mount(tmp_path / "backing", tmp_path / "mnt", "--max-file-size", "1M", "--writeback-cache")
    try:
        fd = os.open(m.mountpoint / "g", os.O_WRONLY | os.O_CREAT, 0o600)
        os.pwrite(fd, b"y", LIMIT)
        assert errno_name(os.close, fd) == "EIO"  # flush at close reports the failed writeback
    finally:
        unmount(m)


SUID_CHILD = r"""
import os, stat
for name in ("s4", "s2", "s6", "s2noexec"):
    fd = os.open(name, os.O_WRONLY)
    os.write(fd, b"x")
    os.close(fd)
    R[name] = oct(stat.S_IMODE(os.stat(name).st_mode))
"""


def test_direct_io_write_by_unprivileged_clears_suid(tmp_path: Path) -> None:
    m = mount(tmp_path / "backing", tmp_path / "mnt", "--direct-io", "--allow-other")
    try:
        root = m.mountpoint
        os.chmod(root, 0o755)
        modes = {"s4": 0o4777, "s2": 0o2777, "s6": 0o6777, "s2noexec": 0o2767}
        for name, mode in modes.items():
            (root / name).write_bytes(b"")
            os.chown(root / name, 65534, 65534)
            os.chmod(root / name, mode)
        (root / "rootfile").write_bytes(b"")
        os.chmod(root / "rootfile", 0o6777)
        got = run_as(root, SUID_CHILD)
        # As tmpfs: setuid always goes, setgid only with group-exec (else it marks mandatory locking).
        assert got == {"s4": "0o777", "s2": "0o777", "s6": "0o777", "s2noexec": "0o2767"}
        with open(root / "rootfile", "ab") as f:  # root keeps them (CAP_FSETID)
            f.write(b"x")
        assert stat.S_IMODE(os.stat(root / "rootfile").st_mode) == 0o6777
    finally:
        unmount(m)
