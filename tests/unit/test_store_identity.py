"""store.identity / store.file_size: what the pin checks read of a blob, without its timestamps."""

from __future__ import annotations

import os
from pathlib import Path

from scratchfs import store


def test_identity_matches_fstat(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    os.link(path, tmp_path / "g")
    fd = os.open(path, os.O_RDONLY)
    try:
        ident = store.identity(fd)
        st = os.fstat(fd)
        assert (ident.st_dev, ident.st_ino, ident.st_mode, ident.st_nlink, ident.st_uid) == (
            st.st_dev, st.st_ino, st.st_mode, 2, st.st_uid,
        )  # fmt: skip
    finally:
        os.close(fd)


def test_identity_of_a_directory_and_a_fifo(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "p")
    for name, kind in ((".", 0o040000), ("p", 0o010000)):
        fd = os.open(tmp_path / name, os.O_RDONLY | os.O_NONBLOCK)
        try:
            assert store.identity(fd).st_mode & 0o170000 == kind
        finally:
            os.close(fd)


def test_file_size_is_the_size_and_positional_io_is_unaffected(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, b"x" * 1000, 0)
        assert store.file_size(fd) == 1000 == os.fstat(fd).st_size
        os.ftruncate(fd, 10)
        assert store.file_size(fd) == 10
        assert os.pread(fd, 100, 0) == b"x" * 10
    finally:
        os.close(fd)
