"""The in-memory namespace, without a mount."""

from __future__ import annotations

import errno
import stat

import pytest

from scratchfs.errors import FsError
from scratchfs.tree import RENAME_EXCHANGE, RENAME_NOREPLACE, ROOT_INO, Directory, Namespace

REG = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755


def err(fn: object, *args: object) -> int:
    with pytest.raises(FsError) as e:
        fn(*args)  # type: ignore[operator]
    return e.value.errno


def test_create_lookup_unlink() -> None:
    ns = Namespace()
    f = ns.create(ROOT_INO, b"a", REG, 0, 0)
    assert ns.lookup(ROOT_INO, b"a") is f
    assert err(ns.create, ROOT_INO, b"a", REG, 0, 0) == errno.EEXIST
    assert err(ns.create, ROOT_INO, b"x" * 256, REG, 0, 0) == errno.ENAMETOOLONG
    ns.create(ROOT_INO, b"y" * 255, REG, 0, 0)
    assert ns.unlink(ROOT_INO, b"a") is f
    assert f.nlink == 0
    assert err(ns.lookup, ROOT_INO, b"a") == errno.ENOENT


def test_directory_link_counts_and_rmdir() -> None:
    ns = Namespace()
    root = ns.get(ROOT_INO)
    d = ns.create(ROOT_INO, b"d", DIR, 0, 0)
    assert root.nlink == 3 and d.nlink == 2
    ns.create(d.ino, b"f", REG, 0, 0)
    assert err(ns.rmdir, ROOT_INO, b"d") == errno.ENOTEMPTY
    assert err(ns.unlink, ROOT_INO, b"d") == errno.EISDIR
    ns.unlink(d.ino, b"f")
    ns.rmdir(ROOT_INO, b"d")
    assert root.nlink == 2


def test_hard_links_and_release() -> None:
    ns = Namespace()
    f = ns.create(ROOT_INO, b"a", REG, 0, 0)
    ns.remember(f)
    ns.link(f.ino, ROOT_INO, b"b")
    assert f.nlink == 2
    ns.unlink(ROOT_INO, b"a")
    assert ns.release_if_unused(f) is None
    ns.unlink(ROOT_INO, b"b")
    assert ns.release_if_unused(f) is None  # the kernel still knows it
    assert ns.forget(f.ino, 1) is f
    assert err(ns.get, f.ino) == errno.ENOENT


def test_rename_variants() -> None:
    ns = Namespace()
    a = ns.create(ROOT_INO, b"a", REG, 0, 0)
    b = ns.create(ROOT_INO, b"b", REG, 0, 0)
    assert err(ns.rename, ROOT_INO, b"a", ROOT_INO, b"b", RENAME_NOREPLACE) == errno.EEXIST
    ns.rename(ROOT_INO, b"a", ROOT_INO, b"b", RENAME_EXCHANGE)
    assert ns.lookup(ROOT_INO, b"a") is b and ns.lookup(ROOT_INO, b"b") is a
    released = ns.rename(ROOT_INO, b"a", ROOT_INO, b"b", 0)
    assert released is a and a.nlink == 0
    assert ns.lookup(ROOT_INO, b"b") is b
    d = ns.create(ROOT_INO, b"d", DIR, 0, 0)
    sub = ns.create(d.ino, b"sub", DIR, 0, 0)
    assert err(ns.rename, ROOT_INO, b"d", sub.ino, b"x", 0) == errno.EINVAL
    assert err(ns.rename, ROOT_INO, b"b", ROOT_INO, b"d", 0) == errno.EISDIR
    assert err(ns.rename, d.ino, b"sub", ROOT_INO, b"b", 0) == errno.ENOTDIR
    ns.rename(d.ino, b"sub", ROOT_INO, b"sub", 0)
    assert d.nlink == 2 and ns.get(ROOT_INO).nlink == 4


def test_setgid_directory_inheritance() -> None:
    ns = Namespace()
    d = ns.create(ROOT_INO, b"d", DIR | stat.S_ISGID, 0, 50)
    f = ns.create(d.ino, b"f", REG, 1000, 1000)
    sub = ns.create(d.ino, b"s", DIR, 1000, 1000)
    assert f.gid == 50 and sub.gid == 50 and sub.mode & stat.S_ISGID


def test_directory_cookies_stable_under_changes() -> None:
    d = Directory()
    for i in range(1000):
        d.add(b"f%d" % i, i + 10)
    seen = []
    cookie = 0
    it = d.entries_after(cookie)
    for _ in range(100):
        cookie, name, _ = next(it)
        seen.append(name)
    # Modify heavily between "readdir calls": remove already-seen and new entries, add more.
    for i in range(0, 100, 2):
        d.remove(b"f%d" % i)
    for i in range(1000, 1200):
        d.add(b"f%d" % i, i + 10)
    for i in range(500, 600):
        d.remove(b"f%d" % i)
    rest = [name for _, name, _ in d.entries_after(cookie)]
    untouched = {b"f%d" % i for i in range(100, 1000) if not 500 <= i < 600}
    listed = seen + rest
    assert len(listed) == len(set(listed))
    assert untouched <= set(rest)


def test_path_of_for_logs() -> None:
    ns = Namespace()
    d = ns.create(ROOT_INO, b"dir", DIR, 0, 0)
    f = ns.create(d.ino, b"file", REG, 0, 0)
    assert ns.path_of(f) == "/dir/file"
    ns.rename(d.ino, b"file", ROOT_INO, b"moved", 0)
    assert ns.path_of(f) == "/moved"
