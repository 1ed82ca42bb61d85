"""Permission checks (default_permissions) as a non-root user, on a mount with --allow-other.

Each test prepares files as root, then runs a child that drops to uid/gid 65534 and reports
what each operation returned ('ok', a value, or an errno name).
"""

from __future__ import annotations

import ctypes
import os
import stat
import struct
from collections.abc import Callable

import pytest

from tests.fs.conftest import Target
from tests.fs.helpers import NOBODY, run_as
from tests.mounting import Mounted


def _prepare(root: os.PathLike[str] | str) -> None:
    r = os.fspath(root)
    os.chmod(r, 0o755)

    def mkfile(name: str, mode: int, uid: int = 0, data: bytes = b"data") -> None:
        p = os.path.join(r, name)
        with open(p, "wb") as f:
            f.write(data)
        os.chown(p, uid, uid)
        os.chmod(p, mode)

    def mkdir(name: str, mode: int, uid: int = 0) -> None:
        p = os.path.join(r, name)
        os.mkdir(p)
        os.chown(p, uid, uid)
        os.chmod(p, mode)

    mkfile("secret", 0o600)
    mkfile("readable", 0o644)
    mkfile("exec", 0o755)
    mkfile("world", 0o666)
    mkdir("closed", 0o700)
    mkfile("closed/f", 0o644)
    mkdir("noexec", 0o744)
    mkfile("noexec/f", 0o644)
    mkdir("ro", 0o755)
    mkfile("ro/f", 0o666)
    mkdir("mine", 0o755, uid=NOBODY)
    mkfile("mine/own", 0o644, uid=NOBODY)
    mkfile("mine/suid", 0o4755, uid=NOBODY)
    mkfile("mine/rootfile", 0o644)
    mkdir("sticky", 0o1777)
    mkfile("sticky/rootfile", 0o666)
    mkfile("sticky/nobodyfile", 0o644, uid=NOBODY)


CHILD = r"""
R["stat secret"] = attempt(os.stat, "secret")
R["read secret"] = attempt(os.open, "secret", os.O_RDONLY)
R["read readable"] = attempt(os.open, "readable", os.O_RDONLY)
R["write readable"] = attempt(os.open, "readable", os.O_WRONLY)
R["truncate readable"] = attempt(os.truncate, "readable", 0)
R["write world"] = attempt(os.open, "world", os.O_WRONLY)
R["access secret R"] = attempt(os.access, "secret", os.R_OK)
R["access readable R"] = attempt(os.access, "readable", os.R_OK)
R["access readable W"] = attempt(os.access, "readable", os.W_OK)
R["access readable X"] = attempt(os.access, "readable", os.X_OK)
R["access exec X"] = attempt(os.access, "exec", os.X_OK)
R["access world RW"] = attempt(os.access, "world", os.R_OK | os.W_OK)
R["access closed/f F"] = attempt(os.access, "closed/f", os.F_OK)
R["list closed"] = attempt(os.listdir, "closed")
R["stat closed/f"] = attempt(os.stat, "closed/f")
R["list noexec"] = attempt(os.listdir, "noexec")
R["stat noexec/f"] = attempt(os.stat, "noexec/f")
R["create in ro"] = attempt(os.open, "ro/new", os.O_CREAT | os.O_WRONLY, 0o644)
R["mkdir in ro"] = attempt(os.mkdir, "ro/newdir")
R["unlink in ro"] = attempt(os.unlink, "ro/f")
R["rename in ro"] = attempt(os.rename, "ro/f", "ro/g")
R["rename out of ro"] = attempt(os.rename, "ro/f", "mine/g")
R["link into ro"] = attempt(os.link, "mine/own", "ro/l")
R["symlink in ro"] = attempt(os.symlink, "x", "ro/s")
R["write ro/f"] = attempt(os.open, "ro/f", os.O_WRONLY)
R["create in mine"] = attempt(os.open, "mine/new", os.O_CREAT | os.O_WRONLY, 0o640)
st = os.stat("mine/new")
R["new owner"] = [st.st_uid, st.st_gid, oct(st.st_mode & 0o7777)]
R["mkdir in mine"] = attempt(os.mkdir, "mine/sub", 0o700)
R["chmod own"] = attempt(os.chmod, "mine/own", 0o600)
R["chmod root file"] = attempt(os.chmod, "mine/rootfile", 0o666)
R["chown own to root"] = attempt(os.chown, "mine/own", 0, 0)
R["chown own to self"] = attempt(os.chown, "mine/own", 65534, 65534)
R["utime own explicit"] = attempt(os.utime, "mine/own", ns=(1, 2))
R["utime root explicit"] = attempt(os.utime, "world", ns=(1, 2))
R["utime root now (writable)"] = attempt(os.utime, "world", None)
R["utime root now (readonly)"] = attempt(os.utime, "readable", None)
R["unlink rootfile in own dir"] = attempt(os.unlink, "mine/rootfile")
R["sticky unlink root's"] = attempt(os.unlink, "sticky/rootfile")
R["sticky rename root's"] = attempt(os.rename, "sticky/rootfile", "sticky/x")
R["sticky unlink own"] = attempt(os.unlink, "sticky/nobodyfile")
R["setxattr readable"] = attempt(os.setxattr, "readable", "user.x", b"1")
R["setxattr world"] = attempt(os.setxattr, "world", "user.x", b"1")
R["setxattr own"] = attempt(os.setxattr, "mine/own", "user.x", b"1")
os.chmod("mine/own", 0o000)
R["open own 000"] = attempt(os.open, "mine/own", os.O_RDONLY)
R["access own 000"] = attempt(os.access, "mine/own", os.R_OK)
fd = os.open("mine/suid", os.O_WRONLY)
os.write(fd, b"x")
os.close(fd)
R["suid after write"] = oct(os.stat("mine/suid").st_mode & 0o7777)
"""

EXPECT = {
    "stat secret": "ok",
    "read secret": "EACCES",
    "read readable": "ok",
    "write readable": "EACCES",
    "truncate readable": "EACCES",
    "write world": "ok",
    "access secret R": False,
    "access readable R": True,
    "access readable W": False,
    "access readable X": False,
    "access exec X": True,
    "access world RW": True,
    "access closed/f F": False,
    "list closed": "EACCES",
    "stat closed/f": "EACCES",
    "list noexec": ["f"],
    "stat noexec/f": "EACCES",
    "create in ro": "EACCES",
    "mkdir in ro": "EACCES",
    "unlink in ro": "EACCES",
    "rename in ro": "EACCES",
    "rename out of ro": "EACCES",
    "link into ro": "EACCES",
    "symlink in ro": "EACCES",
    "write ro/f": "ok",
    "create in mine": "ok",
    "new owner": [NOBODY, NOBODY, "0o640"],
    "mkdir in mine": "ok",
    "chmod own": "ok",
    "chmod root file": "EPERM",
    "chown own to root": "EPERM",
    "chown own to self": "ok",
    "utime own explicit": "ok",
    "utime root explicit": "EPERM",
    "utime root now (writable)": "ok",
    "utime root now (readonly)": "EACCES",
    "unlink rootfile in own dir": "ok",
    "sticky unlink root's": "EPERM",
    "sticky rename root's": "EPERM",
    "sticky unlink own": "ok",
    "setxattr readable": "EACCES",
    "setxattr world": "ok",
    "setxattr own": "ok",
    "open own 000": "EACCES",
    "access own 000": False,
    "suid after write": "0o755",
}


def test_permissions_as_nobody(fs_shared: Target) -> None:
    root = fs_shared.root / "perm"
    os.mkdir(root)
    _prepare(root)
    got = run_as(root, CHILD)
    mismatches = {k: (got.get(k), v) for k, v in EXPECT.items() if got.get(k) != v}
    assert not mismatches, f"(got, expected): {mismatches}"
    # Nothing the child was refused changed anything.
    assert sorted(os.listdir(root / "ro")) == ["f"]
    assert (root / "readable").read_bytes() == b"data"
    assert (root / "secret").read_bytes() == b"data"
    assert os.path.exists(root / "sticky" / "rootfile")
    assert not os.path.exists(root / "sticky" / "nobodyfile")
    st = os.stat(root / "mine" / "sub")
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (NOBODY, 0o700)


def test_group_permissions(fs_shared: Target) -> None:
    root = fs_shared.root / "grp"
    os.mkdir(root, 0o755)
    for name, gid, mode in (("g-rw", NOBODY, 0o060), ("g-none", NOBODY, 0o606),
                            ("other-group", 1234, 0o064)):
        p = root / name
        p.write_bytes(b"g")
        os.chown(p, 0, gid)
        os.chmod(p, mode)
    code = """
R["g-rw"] = attempt(os.open, "g-rw", os.O_RDWR)
R["g-none"] = attempt(os.open, "g-none", os.O_RDONLY)
R["other-group"] = attempt(os.open, "other-group", os.O_RDONLY)
R["other-group W"] = attempt(os.open, "other-group", os.O_WRONLY)
"""
    got = run_as(root, code)
    # g-none: the group class matches and denies, even though "other" would allow.
    assert got == {"g-rw": "ok", "g-none": "EACCES", "other-group": "ok",
                   "other-group W": "EACCES"}


def _mode_from_cache(path: os.PathLike[str]) -> int:
    """st_mode from a statx(2) that asks for the mode alone: the kernel answers from its cached
    attributes unless the mode itself was invalidated (a full stat(2) also asks for st_blocks,
    which every write invalidates, so it would re-ask the daemon and hide a stale mode)."""
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(256)  # struct statx
    if libc.statx(_AT_FDCWD, os.fsencode(path), 0, _STATX_MODE, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fspath(path))
    (mode,) = struct.unpack_from("=H", buf, 28)  # stx_mode, after mask, blksize, attributes, nlink, uid, gid
    return int(mode)


_AT_FDCWD = -100
_STATX_MODE = 0x2


def test_set_id_bits_cleared_by_a_direct_write_are_not_cached(mount_factory: Callable[..., Mounted]) -> None:
    """Under --direct-io the daemon clears set-id bits of a file written by a process without
    CAP_FSETID, behind the kernel's cached mode; with the scratch profile's long attribute
    timeout the kernel showed the old mode for a day unless the daemon invalidates it."""
    if os.environ.get("SCRATCHFS_TEST_TARGET") == "tmpfs":
        pytest.skip("about scratchfs --direct-io")
    m = mount_factory("--profile", "scratch", "--direct-io", "--allow-other")
    os.chmod(m.mountpoint, 0o755)
    p = m.mountpoint / "suid"
    p.write_bytes(b"")
    os.chown(p, NOBODY, NOBODY)
    os.chmod(p, 0o4777)
    assert _mode_from_cache(p) & 0o7777 == 0o4777  # cached now
    run_as(m.mountpoint, 'fd = os.open("suid", os.O_WRONLY)\nos.write(fd, b"x")\nos.close(fd)\n')
    assert oct(_mode_from_cache(p) & 0o7777) == "0o777"
    assert oct(stat.S_IMODE(os.stat(p).st_mode)) == "0o777"
