"""Helpers for the security suite: find a file's blob, read blocks exactly, poke at records.

Reads go through O_DIRECT with a page-aligned buffer, so each read reaches the daemon as exactly
the requested block (no readahead that would touch, and log, neighbouring blocks) and nothing is
served from the page cache.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
from collections.abc import Callable
from pathlib import Path

from scratchfs.blocks import OVERHEAD
from tests.mounting import Mounted

BS = 4096
RECORD = BS + OVERHEAD

WARNING_RE = re.compile(r" WARNING scratchfs\.fuse: event=integrity_failure path=(\S+) ino=\d+ block=(\S+) reason=")


def write_file(path: Path, data: bytes) -> None:
    """Create/overwrite *path* with *data* through the mount and close it."""
    with open(path, "wb") as f:
        f.write(data)


def write_new_file(m: Mounted, path: Path, data: bytes) -> Path:
    """Write a new file and return the blob that appeared for it in the backing store."""
    before = set(m.blobs())
    write_file(path, data)
    new = set(m.blobs()) - before
    assert len(new) == 1, f"expected exactly one new blob for {path.name}, got {len(new)}"
    return new.pop()


def read_block(path: Path, index: int, block_size: int = BS) -> bytes:
    """Read block *index* of *path* with O_DIRECT (a fresh open: the daemon re-reads the blob)."""
    buf = mmap.mmap(-1, block_size)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            n = os.preadv(fd, [buf], index * block_size)
        finally:
            os.close(fd)
        return bytes(buf[:n])
    finally:
        buf.close()


def read_errno(fn: Callable[[], object]) -> int:
    """Run *fn*; 0 if it succeeded, else the errno of the OSError it raised."""
    try:
        fn()
    except OSError as e:
        return e.errno or -1
    return 0


def assert_block_eio(path: Path, index: int, block_size: int = BS) -> None:
    """The read of block *index* must fail with EIO (never return data)."""
    try:
        data = read_block(path, index, block_size)
    except OSError as e:
        got = errno.errorcode.get(e.errno or 0)
        assert e.errno == errno.EIO, f"block {index} of {path.name}: expected EIO, got {got}"
        return
    raise AssertionError(f"block {index} of {path.name} was served ({len(data)} bytes) after tampering")


def assert_block_ok(path: Path, index: int, expected: bytes, block_size: int = BS) -> None:
    """Block *index* reads back exactly *expected*."""
    got = read_block(path, index, block_size)
    assert got == expected, f"block {index} of {path.name} reads back wrong data"


def record(blob: Path, index: int, length: int = RECORD) -> bytes:
    """The raw record of block *index* in *blob*."""
    with open(blob, "rb") as f:
        f.seek(index * RECORD)
        return f.read(length)


def put_record(blob: Path, index: int, data: bytes) -> None:
    """Overwrite bytes at block *index*'s record offset in place (the daemon's fd sees it)."""
    with open(blob, "r+b") as f:
        f.seek(index * RECORD)
        f.write(data)


def overwrite_in_place(blob: Path, data: bytes) -> None:
    """Replace the whole content of *blob* without changing its inode (what `cp` over it does)."""
    with open(blob, "r+b") as f:
        f.truncate(0)
        f.write(data)


class LogWatch:
    """Integrity WARNING lines a daemon logged since this watch was made."""

    def __init__(self, m: Mounted) -> None:
        self.m = m
        self.start = len(m.log_text())

    def lines(self) -> list[str]:
        return self.m.log_text()[self.start :].splitlines()

    def integrity(self) -> list[tuple[str, str]]:
        """(path, block) of every integrity_failure WARNING since the watch began."""
        out = []
        for line in self.lines():
            match = WARNING_RE.search(line)
            if match:
                out.append((match.group(1), match.group(2)))
        return out

    def assert_named(self, mount_path: str, blocks: set[str], reads: int | None = None) -> None:
        """Warnings were logged, every one names *mount_path*, and together exactly *blocks*.

        With *reads*, also exactly one line per failed read (O_DIRECT reads reach the daemon once).
        """
        found = self.integrity()
        assert found, f"no integrity_failure WARNING logged for {mount_path}"
        if reads is not None:
            assert len(found) == reads, f"{len(found)} WARNING lines for {reads} failed read(s): want one each"
        assert {p for p, _ in found} == {mount_path}, f"warnings name other paths: {found}"
        assert {b for _, b in found} == blocks, f"warnings name blocks {sorted({b for _, b in found})}, not {blocks}"
