"""Canaries: plaintext markers written through the mount must never reach the backing store.

Names, contents, xattr names and values, and symlink targets carry unique markers; after fsync
every byte of every file below the backing directory (and every name there) is searched for
each marker and for every 16-byte window of it, so that a marker split over a block boundary
is still found. After unmount the store holds the marker file `.scratchfs` and nothing else.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fs.conftest import DEFAULT_BLOCK_SIZE
from tests.mounting import Mounted, mount, unmount

WINDOW = 16

pytestmark = pytest.mark.usefixtures("scratchfs_only")


def new_marker(kind: str) -> str:
    """A 32-character marker that cannot occur by chance."""
    return f"CNRY{kind[:4]:_<4}{secrets.token_hex(12)}"


def needles(markers: list[str]) -> set[bytes]:
    out: set[bytes] = set()
    for m in markers:
        b = m.encode()
        out.update(b[i : i + WINDOW] for i in range(len(b) - WINDOW + 1))
    return out


def leaks_in_tree(root: Path, markers: list[str]) -> list[str]:
    """Every place below *root* (file names or file bytes) where a marker window occurs."""
    found = []
    ns = needles(markers)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            if any(n.decode() in name for n in ns):
                found.append(f"name {os.path.join(dirpath, name)}")
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                data = f.read()
            hits = sorted({n.decode() for n in ns if n in data})
            if hits:
                found.append(f"content of {path}: {hits[:3]}")
    return found


@pytest.fixture
def canary_mount(tmp_path: Path) -> Iterator[Mounted]:
    m = mount(tmp_path / "backing", tmp_path / "mnt", "--debug")
    try:
        yield m
    finally:
        unmount(m)


def plant(root: Path, bs: int) -> tuple[list[str], list[str], list[int]]:
    """Write marked names and data below root.

    Returns (name markers, secret markers, descriptors the caller must close): one file is
    left open and unlinked, so its data is in the store with no name pointing at it.
    """
    names: list[str] = []
    secrets_: list[str] = []

    def nm(kind: str) -> str:
        m = new_marker(kind)
        names.append(m)
        return m

    def sm(kind: str) -> str:
        m = new_marker(kind)
        secrets_.append(m)
        return m

    d = root / f"dir-{nm('dir')}"
    os.mkdir(d)
    for size in (100, bs - 7, bs, 3 * bs + 5):
        content = sm("data")
        body = bytearray((content + "\n").encode() * (size // 33 + 1))[:size]
        # One more copy straddling the first block boundary.
        if size > bs:
            body[bs - 10 : bs - 10 + len(content)] = content.encode()
        p = d / f"file-{nm('file')}-{size}"
        with open(p, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
    # A sparse file with data far out.
    fd = os.open(d / f"sparse-{nm('sprs')}", os.O_CREAT | os.O_RDWR, 0o600)
    os.pwrite(fd, sm("sprs").encode(), 10 * bs + 3)
    os.fsync(fd)
    os.close(fd)
    # xattrs, symlinks, hard links.
    target = d / f"xattr-holder-{nm('xhld')}"
    target.write_bytes(b"")
    os.setxattr(target, f"user.{nm('xnam')}", sm("xval").encode())
    os.symlink(f"../{sm('slnk')}/target", d / f"link-{nm('lnam')}")
    os.link(target, d / f"hard-{nm('hard')}")
    # An open, unlinked file.
    p = d / f"unlinked-{nm('unln')}"
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o600)
    os.write(fd, (sm("unln") + "\n").encode() * 100)
    os.fsync(fd)
    os.unlink(p)
    return names, secrets_, [fd]


def test_no_marker_in_backing_store(canary_mount: Mounted) -> None:
    m = canary_mount
    d = m.mountpoint / f"dir-{new_marker('open')}"
    os.mkdir(d)
    secret_open = new_marker("held")
    fds: list[int] = []
    try:
        # An fsynced file, unlinked but held open while the store is searched.
        fd = os.open(d / "held", os.O_CREAT | os.O_RDWR, 0o600)
        fds.append(fd)
        os.write(fd, (secret_open + "\n").encode() * 5000)
        os.fsync(fd)
        os.unlink(d / "held")
        names, secret, more = plant(m.mountpoint, DEFAULT_BLOCK_SIZE)
        fds += more
        os.sync()
        assert m.blobs(), "nothing reached the backing store: the search would prove nothing"
        leaks = leaks_in_tree(m.backing, [*names, *secret, secret_open, d.name[4:]])
        assert not leaks, leaks
        # Sanity of the search itself: the markers are readable through the mount.
        assert os.pread(fd, len(secret_open), 0) == secret_open.encode()
    finally:
        for x in fds:
            os.close(x)
    # The debug log may name files, but never holds contents, xattr values or link targets.
    log = m.log_text()
    assert "mounted" in log
    leaked = sorted(s[4:8] for s in [*secret, secret_open] if s in log)
    assert not leaked, f"plaintext of these kinds reached the debug log: {leaked}"


def test_store_empty_after_unmount(tmp_path: Path) -> None:
    m = mount(tmp_path / "backing", tmp_path / "mnt")
    try:
        _, _, fds = plant(m.mountpoint, DEFAULT_BLOCK_SIZE)
        for x in fds:
            os.close(x)
        fd = os.open(m.mountpoint / "last-file", os.O_CREAT | os.O_RDWR, 0o600)
        os.write(fd, b"x" * 100_000)
        os.close(fd)
        assert m.blobs()
    finally:
        unmount(m)
    assert sorted(os.listdir(m.backing)) == [".scratchfs"]


def test_blob_removed_when_last_link_and_handle_go(tmp_path: Path) -> None:
    m = mount(tmp_path / "backing", tmp_path / "mnt")
    try:
        before = set(m.blobs())
        p = m.mountpoint / "f"
        p.write_bytes(b"y" * 200_000)
        os.link(p, m.mountpoint / "g")
        created = set(m.blobs()) - before
        assert created, "a written file must have a blob"
        fd = os.open(p, os.O_RDONLY)
        os.unlink(p)
        os.unlink(m.mountpoint / "g")
        # Still open: the blob must still be there and readable through the handle.
        assert created <= set(m.blobs())
        assert os.pread(fd, 3, 0) == b"yyy"
        os.close(fd)
        # release() reaches the daemon asynchronously after close(); wait boundedly.
        deadline = time.monotonic() + 10
        while created & set(m.blobs()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not created & set(m.blobs()), "blob of a deleted, closed file left behind"
    finally:
        unmount(m)
