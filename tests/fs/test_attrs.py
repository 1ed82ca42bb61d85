"""Attributes: chmod, chown, times with nanoseconds, user.* xattrs, statfs, access() as root."""

from __future__ import annotations

import errno
import os
import stat
import time

import pytest

from tests.fs.conftest import Target
from tests.fs.helpers import UTIME_NOW, UTIME_OMIT, errname, utimensat

ATIME = 1_600_000_000_123_456_789
MTIME = 1_500_000_000_987_654_321


def test_chmod(fs: Target) -> None:
    p = fs.root / "f"
    p.write_bytes(b"")
    for mode in (0o000, 0o640, 0o777, 0o4755, 0o2755, 0o1644):
        os.chmod(p, mode)
        assert stat.S_IMODE(os.stat(p).st_mode) == mode
    os.mkdir(fs.root / "d")
    os.chmod(fs.root / "d", 0o3711)
    st = os.stat(fs.root / "d")
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o3711


def test_chmod_through_handle_and_ctime(fs: Target) -> None:
    p = fs.root / "f"
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        before = os.fstat(fd).st_ctime_ns
        os.fchmod(fd, 0o604)
        st = os.fstat(fd)
        assert stat.S_IMODE(st.st_mode) == 0o604
        assert st.st_ctime_ns >= before
    finally:
        os.close(fd)


def test_chown(fs: Target) -> None:
    p = fs.root / "f"
    p.write_bytes(b"")
    os.chown(p, 1234, 5678)
    st = os.stat(p)
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.chown(p, -1, 42)
    st = os.stat(p)
    assert (st.st_uid, st.st_gid) == (1234, 42)
    os.symlink("f", fs.root / "s")
    os.chown(fs.root / "s", 7, 8, follow_symlinks=False)
    ls = os.lstat(fs.root / "s")
    assert (ls.st_uid, ls.st_gid) == (7, 8)
    assert os.stat(p).st_uid == 1234  # the target did not change


def test_chown_clears_setuid(fs: Target) -> None:
    p = fs.root / "f"
    p.write_bytes(b"")
    os.chmod(p, 0o4755)
    os.chown(p, 1000, 1000)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o755


def test_new_file_owner_is_caller(fs: Target) -> None:
    (fs.root / "f").write_bytes(b"")
    st = os.stat(fs.root / "f")
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())


def test_utimens_nanoseconds(fs: Target) -> None:
    p = fs.root / "f"
    p.write_bytes(b"x")
    os.utime(p, ns=(ATIME, MTIME))
    st = os.stat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == (ATIME, MTIME)
    os.mkdir(fs.root / "d")
    os.utime(fs.root / "d", ns=(ATIME + 1, MTIME + 1))
    st = os.stat(fs.root / "d")
    assert (st.st_atime_ns, st.st_mtime_ns) == (ATIME + 1, MTIME + 1)
    # Times before 1970 and far after 2038.
    os.utime(p, ns=(-1_000_000_000 * 86400 + 5, 4_102_444_800_000_000_001))
    st = os.stat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == (-86_400_000_000_000 + 5, 4_102_444_800_000_000_001)


def test_utimens_omit_and_now(fs: Target) -> None:
    p = fs.root / "f"
    p.write_bytes(b"x")
    os.utime(p, ns=(ATIME, MTIME))
    utimensat(p, (0, UTIME_OMIT), (1_700_000_000, 5))
    st = os.stat(p)
    assert st.st_atime_ns == ATIME
    assert st.st_mtime_ns == 1_700_000_000_000_000_005
    before = time.time_ns() - 2_000_000_000
    utimensat(p, (0, UTIME_NOW), (0, UTIME_OMIT))
    st = os.stat(p)
    assert st.st_atime_ns >= before
    assert st.st_mtime_ns == 1_700_000_000_000_000_005


def test_utimens_symlink_itself(fs: Target) -> None:
    (fs.root / "t").write_bytes(b"")
    os.utime(fs.root / "t", ns=(ATIME, MTIME))
    os.symlink("t", fs.root / "s")
    os.utime(fs.root / "s", ns=(ATIME + 7, MTIME + 7), follow_symlinks=False)
    ls = os.lstat(fs.root / "s")
    assert (ls.st_atime_ns, ls.st_mtime_ns) == (ATIME + 7, MTIME + 7)
    st = os.stat(fs.root / "t")
    assert (st.st_atime_ns, st.st_mtime_ns) == (ATIME, MTIME)


def test_write_updates_mtime_and_ctime(fs: Target) -> None:
    p = fs.root / "f"
    p.write_bytes(b"x")
    os.utime(p, ns=(ATIME, MTIME))
    ctime_before = os.stat(p).st_ctime_ns
    with open(p, "ab") as f:
        f.write(b"y")
    st = os.stat(p)
    assert st.st_mtime_ns > MTIME
    assert st.st_ctime_ns >= ctime_before


def test_create_updates_parent_mtime(fs: Target) -> None:
    d = fs.root / "d"
    os.mkdir(d)
    os.utime(d, ns=(ATIME, MTIME))
    (d / "f").write_bytes(b"")
    assert os.stat(d).st_mtime_ns > MTIME
    os.utime(d, ns=(ATIME, MTIME))
    os.unlink(d / "f")
    assert os.stat(d).st_mtime_ns > MTIME


@pytest.mark.usefixtures("needs_xattrs")
def test_xattr_roundtrip(fs: Target) -> None:
    p = fs.root / "f"
    p.write_bytes(b"")
    assert os.listxattr(p) == []
    os.setxattr(p, "user.one", b"1")
    os.setxattr(p, "user.bin", bytes(range(256)))
    os.setxattr(p, "user.empty", b"")
    os.setxattr(p, "user.big", b"B" * 65536)
    assert os.getxattr(p, "user.one") == b"1"
    assert os.getxattr(p, "user.bin") == bytes(range(256))
    assert os.getxattr(p, "user.empty") == b""
    assert os.getxattr(p, "user.big") == b"B" * 65536
    assert sorted(os.listxattr(p)) == ["user.big", "user.bin", "user.empty", "user.one"]
    os.setxattr(p, "user.one", b"replaced")
    assert os.getxattr(p, "user.one") == b"replaced"
    os.removexattr(p, "user.one")
    assert errname(lambda: os.getxattr(p, "user.one")) == "ENODATA"
    assert errname(lambda: os.removexattr(p, "user.one")) == "ENODATA"
    assert sorted(os.listxattr(p)) == ["user.big", "user.bin", "user.empty"]


@pytest.mark.usefixtures("needs_xattrs")
def test_xattr_flags(fs: Target) -> None:
    p = fs.root / "f"
    p.write_bytes(b"")
    assert errname(lambda: os.setxattr(p, "user.a", b"x", os.XATTR_REPLACE)) == "ENODATA"
    os.setxattr(p, "user.a", b"x", os.XATTR_CREATE)
    assert errname(lambda: os.setxattr(p, "user.a", b"y", os.XATTR_CREATE)) == "EEXIST"
    os.setxattr(p, "user.a", b"z", os.XATTR_REPLACE)
    assert os.getxattr(p, "user.a") == b"z"


@pytest.mark.usefixtures("needs_xattrs")
def test_xattr_on_dir_and_shared_by_hard_links(fs: Target) -> None:
    os.mkdir(fs.root / "d")
    os.setxattr(fs.root / "d", "user.dir", b"yes")
    assert os.getxattr(fs.root / "d", "user.dir") == b"yes"
    (fs.root / "f").write_bytes(b"")
    os.link(fs.root / "f", fs.root / "g")
    os.setxattr(fs.root / "f", "user.k", b"v")
    assert os.getxattr(fs.root / "g", "user.k") == b"v"
    # Renames keep xattrs.
    os.rename(fs.root / "g", fs.root / "d" / "h")
    assert os.getxattr(fs.root / "d" / "h", "user.k") == b"v"


@pytest.mark.usefixtures("needs_xattrs")
def test_xattr_limits(fs: Target) -> None:
    p = fs.root / "f"
    p.write_bytes(b"")
    assert errname(lambda: os.setxattr(p, "user." + "n" * 251, b"v")) == "ERANGE"
    os.setxattr(p, "user." + "n" * 250, b"v")  # 255-byte name is the limit
    assert errname(lambda: os.setxattr(p, "user.toobig", b"x" * 65537)) == "E2BIG"


@pytest.mark.usefixtures("needs_xattrs")
def test_xattr_names_other_than_user(fs: Target) -> None:
    p = fs.root / "f"
    p.write_bytes(b"")
    assert errname(lambda: os.setxattr(p, "bogus.name", b"v")) == errno.errorcode[errno.EOPNOTSUPP]
    assert errname(lambda: os.getxattr(p, "user.missing")) == "ENODATA"


def test_statfs(fs: Target) -> None:
    sv = os.statvfs(fs.root)
    assert sv.f_bsize > 0 and sv.f_frsize > 0
    assert sv.f_blocks > 0
    assert sv.f_blocks >= sv.f_bfree >= sv.f_bavail
    assert sv.f_namemax == 255
    if fs.mounted is not None:
        # Reflects the backing store: same total size, free space of the same order.
        back = os.statvfs(fs.mounted.backing)
        total, back_total = sv.f_blocks * sv.f_frsize, back.f_blocks * back.f_frsize
        assert abs(total - back_total) <= back_total // 100
        free, back_free = sv.f_bavail * sv.f_frsize, back.f_bavail * back.f_frsize
        assert abs(free - back_free) <= back_total // 20


def test_statfs_sees_usage(fs1: Target) -> None:
    """Writing a large file lowers free space; deleting it gives the space back."""
    chunk = os.urandom(1 << 20)
    before = os.statvfs(fs1.root)
    p = fs1.root / "big"
    with open(p, "wb") as f:
        for _ in range(256):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    during = os.statvfs(fs1.root)
    os.unlink(p)
    used = (before.f_bfree - during.f_bfree) * before.f_frsize
    # Other processes share the disk, so only the order of magnitude is checked.
    assert used >= 128 << 20


def test_access_as_root(fs: Target) -> None:
    p = fs.root / "f"
    p.write_bytes(b"")
    os.chmod(p, 0o000)
    assert os.access(p, os.R_OK | os.W_OK)
    assert not os.access(p, os.X_OK)  # root needs at least one x bit
    os.chmod(p, 0o010)
    assert os.access(p, os.X_OK)
    assert os.access(p, os.F_OK)
    assert not os.access(fs.root / "missing", os.F_OK)
    os.mkdir(fs.root / "d", 0o000)
    assert os.access(fs.root / "d", os.R_OK | os.W_OK | os.X_OK)


@pytest.mark.parametrize("mode", [0o444, 0o000])
def test_root_writes_readonly_file(fs: Target, mode: int) -> None:
    p = fs.root / "f"
    p.write_bytes(b"old")
    os.chmod(p, mode)
    with open(p, "r+b") as f:
        f.write(b"new")
    assert p.read_bytes() == b"new"
