"""Faults of the backing store: a full disk gives ENOSPC, broken blobs give EIO, never wrong data."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mounting import Mounted, is_mounted, mount, unmount
from tests.security.helpers import BS, LogWatch, read_block, write_file, write_new_file

CHUNK = 256 * 1024


@pytest.fixture
def small_backing(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs to use as the backing directory; unmounted at teardown."""
    where = tmp_path / "small"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], check=False)
        assert not is_mounted(where)


def _chunk(n: int) -> bytes:
    """Deterministic, incompressible, distinct content for chunk *n*."""
    return b"".join(hashlib.sha256(b"%d/%d" % (n, k)).digest() for k in range(CHUNK // 32))


def test_full_backing_store_gives_enospc_and_keeps_data(small_backing: Path, tmp_path: Path) -> None:
    m = mount(small_backing, tmp_path / "mnt", "--block-size", str(BS))
    try:
        root = m.mountpoint
        keep = os.urandom(2 * 1024 * 1024)
        write_file(root / "keep", keep)
        watch = LogWatch(m)
        written = 0
        fd = os.open(root / "fill", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            failure = None
            for n in range(64):  # 16 MiB: twice what the store can hold
                chunk = _chunk(n)
                done = 0
                try:
                    while done < len(chunk):
                        done += os.write(fd, chunk[done:])
                except OSError as e:
                    failure = e
                written += done
                if failure is not None:
                    break
        finally:
            os.close(fd)
        assert failure is not None, "16 MiB fitted into an 8 MiB store?"
        assert failure.errno == errno.ENOSPC, f"expected ENOSPC, got {errno.errorcode.get(failure.errno or 0)}"
        assert written > 0
        # Earlier data is intact: the untouched file, and every byte of "fill" the caller was told was written.
        assert (root / "keep").read_bytes() == keep
        assert os.stat(root / "fill").st_size == written
        expected = b"".join(_chunk(n) for n in range(written // CHUNK + 1))[:written]
        assert (root / "fill").read_bytes() == expected
        assert watch.integrity() == [], "a failed write left a block that no longer authenticates"
        # Partial writes into existing blocks also fail cleanly and leave the old content.
        with open(root / "keep", "r+b") as f, pytest.raises(OSError) as info:
            f.seek(len(keep))
            f.write(os.urandom(4 * 1024 * 1024))
            f.flush()
        assert info.value.errno == errno.ENOSPC
        assert (root / "keep").read_bytes()[: len(keep)] == keep
        # Space freed: writes work again.
        (root / "fill").unlink()
        again = os.urandom(3 * 1024 * 1024)
        write_file(root / "again", again)
        assert (root / "again").read_bytes() == again
        assert (root / "keep").read_bytes()[: len(keep)] == keep
    finally:
        unmount(m)
    assert [p.name for p in small_backing.iterdir()] == [".scratchfs"]


def _read_in_child(path: Path, timeout: float = 30.0) -> tuple[int, bytes]:
    """Read block 0 of *path* in a child process (so a hung daemon cannot hang the test)."""
    code = (
        "import mmap, os, sys\n"
        "buf = mmap.mmap(-1, 4096)\n"
        "try:\n"
        "    fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT)\n"
        "    n = os.preadv(fd, [buf], 0)\n"
        "except OSError as e:\n"
        "    sys.exit(e.errno)\n"
        "sys.stdout.buffer.write(buf[:n])\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, timeout=timeout, check=False)
    return r.returncode, r.stdout


def _replace_with_directory(blob: Path) -> None:
    blob.unlink()
    blob.mkdir()


def _replace_with_fifo(blob: Path) -> None:
    blob.unlink()
    os.mkfifo(blob)


def _replace_with_symlink_to_other_blob(blob: Path) -> None:
    others = sorted(p for p in blob.parent.iterdir() if p != blob and p.name != ".scratchfs" and p.is_file())
    blob.unlink()
    blob.symlink_to(others[0])


def _replace_with_unreadable_file(blob: Path) -> None:
    # Root ignores permission bits, so an empty file with the right name is what "unreadable" can mean here.
    blob.unlink()
    blob.write_bytes(b"")


@pytest.mark.parametrize(
    "breaker",
    [
        pytest.param(_replace_with_directory, id="directory"),
        pytest.param(_replace_with_fifo, id="fifo"),
        pytest.param(_replace_with_symlink_to_other_blob, id="symlink"),
        pytest.param(_replace_with_unreadable_file, id="empty-file"),
    ],
)
def test_broken_blob_gives_eio_never_data(tmp_path: Path, breaker: object) -> None:
    """Swap the blob for something the daemon cannot use; reads and writes fail with EIO, others work."""
    assert callable(breaker)
    m: Mounted = mount(tmp_path / "backing", tmp_path / "mnt", "--block-size", str(BS))
    try:
        other = os.urandom(3 * BS)
        write_new_file(m, m.mountpoint / "other", other)
        blob = write_new_file(m, m.mountpoint / "victim", os.urandom(3 * BS))
        breaker(blob)
        code, data = _read_in_child(m.mountpoint / "victim")
        assert code == errno.EIO, f"read gave {errno.errorcode.get(code, code)} and {len(data)} bytes, not EIO"
        with pytest.raises(OSError) as info:
            fd = os.open(m.mountpoint / "victim", os.O_WRONLY)
            try:
                os.pwrite(fd, b"y" * 100, 10)
            finally:
                os.close(fd)
        assert info.value.errno == errno.EIO
        for i in range(3):
            assert read_block(m.mountpoint / "other", i) == other[i * BS : (i + 1) * BS]
        assert "event=" in m.log_text() and " WARNING " in m.log_text()
        # Removing the broken file must work and the store must accept new files.
        (m.mountpoint / "victim").unlink()
        write_file(m.mountpoint / "new", b"fine")
        assert (m.mountpoint / "new").read_bytes() == b"fine"
    finally:
        unmount(m)
    assert [p.name for p in m.backing.iterdir()] == [".scratchfs"], "unmount did not clear the store"
