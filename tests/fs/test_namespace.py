"""Namespace semantics: directories, names, links, symlinks, rename, unlink of open files."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from tests.fs.conftest import Target
from tests.fs.helpers import RENAME_EXCHANGE, RENAME_NOREPLACE, errname, renameat2, write_all

# --- plain error cases ---------------------------------------------------------------------


def test_enoent(fs: Target) -> None:
    r = fs.root
    assert errname(lambda: os.stat(r / "missing")) == "ENOENT"
    assert errname(lambda: os.open(r / "missing", os.O_RDONLY)) == "ENOENT"
    assert errname(lambda: os.unlink(r / "missing")) == "ENOENT"
    assert errname(lambda: os.rmdir(r / "missing")) == "ENOENT"
    assert errname(lambda: os.rename(r / "missing", r / "x")) == "ENOENT"
    assert errname(lambda: os.link(r / "missing", r / "x")) == "ENOENT"
    assert errname(lambda: os.readlink(r / "missing")) == "ENOENT"
    assert errname(lambda: os.mkdir(r / "missing" / "sub")) == "ENOENT"
    assert errname(lambda: os.open(r / "missing" / "f", os.O_CREAT | os.O_WRONLY)) == "ENOENT"
    assert errname(lambda: os.chmod(r / "missing", 0o644)) == "ENOENT"
    assert not os.path.lexists(r / "x")


def test_eexist(fs: Target) -> None:
    r = fs.root
    (r / "f").write_bytes(b"")
    os.mkdir(r / "d")
    os.symlink("f", r / "s")
    for name in ("f", "d", "s"):
        p = r / name
        assert errname(lambda: os.mkdir(p)) == "EEXIST"  # noqa: B023 - called at once
        assert errname(lambda: os.symlink("t", p)) == "EEXIST"  # noqa: B023
        assert errname(lambda: os.link(r / "f", p)) == "EEXIST"  # noqa: B023
        assert errname(lambda: os.mknod(p, 0o644 | stat.S_IFREG)) == "EEXIST"  # noqa: B023


def test_enotempty_and_rmdir(fs: Target) -> None:
    r = fs.root
    os.makedirs(r / "d" / "sub")
    assert errname(lambda: os.rmdir(r / "d")) == "ENOTEMPTY"
    os.rmdir(r / "d" / "sub")
    (r / "d" / "f").write_bytes(b"x")
    assert errname(lambda: os.rmdir(r / "d")) == "ENOTEMPTY"
    os.unlink(r / "d" / "f")
    os.rmdir(r / "d")
    assert not os.path.lexists(r / "d")


def test_eisdir(fs: Target) -> None:
    r = fs.root
    os.mkdir(r / "d")
    assert errname(lambda: os.unlink(r / "d")) == "EISDIR"
    assert errname(lambda: os.open(r / "d", os.O_WRONLY)) == "EISDIR"
    assert errname(lambda: os.open(r / "d", os.O_RDWR)) == "EISDIR"
    fd = os.open(r / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert errname(lambda: os.read(fd, 10)) == "EISDIR"
    finally:
        os.close(fd)


def test_enotdir(fs: Target) -> None:
    r = fs.root
    (r / "f").write_bytes(b"x")
    assert errname(lambda: os.rmdir(r / "f")) == "ENOTDIR"
    assert errname(lambda: os.listdir(r / "f")) == "ENOTDIR"
    assert errname(lambda: os.stat(r / "f" / "x")) == "ENOTDIR"
    assert errname(lambda: os.mkdir(r / "f" / "x")) == "ENOTDIR"
    assert errname(lambda: os.open(r / "f" / "x", os.O_CREAT | os.O_WRONLY)) == "ENOTDIR"
    assert errname(lambda: os.open(r / "f", os.O_RDONLY | os.O_DIRECTORY)) == "ENOTDIR"


@pytest.mark.parametrize("name_len", [255, 256])
def test_name_length_limit(fs: Target, name_len: int) -> None:
    r = fs.root
    os.mkdir(r / "d")
    (r / "src").write_bytes(b"s")
    name = "n" * name_len
    ops = {
        "create": lambda: os.close(os.open(r / name, os.O_CREAT | os.O_WRONLY, 0o644)),
        "mkdir": lambda: os.mkdir(r / "d" / name),
        "symlink": lambda: os.symlink("src", r / "d" / ("s" * name_len)),
        "link": lambda: os.link(r / "src", r / "d" / ("l" * name_len)),
        "rename": lambda: os.rename(r / "src", r / "d" / ("r" * name_len)),
        "mknod": lambda: os.mknod(r / "d" / ("m" * name_len), 0o644 | stat.S_IFREG),
    }
    expect = "ok" if name_len == 255 else "ENAMETOOLONG"
    results = {k: errname(op) for k, op in ops.items()}
    assert results == dict.fromkeys(ops, expect)
    assert errname(lambda: os.stat(r / ("q" * name_len))) == (
        "ENOENT" if name_len == 255 else "ENAMETOOLONG"
    )
    if name_len == 255:
        assert name in os.listdir(r)
        assert len(os.listdir(r / "d")) == 5


def test_name_length_counts_bytes_not_characters(fs: Target) -> None:
    ok = "\u20ac" * 85  # 255 bytes of UTF-8
    too_long = ok + "x"
    (fs.root / ok).write_bytes(b"1")
    assert ok in os.listdir(fs.root)
    assert errname(lambda: (fs.root / too_long).write_bytes(b"1")) == "ENAMETOOLONG"


def test_odd_names(fs: Target) -> None:
    names = ["with space", "new\nline", "\u00e9t\u00e9", "-dash", ".hidden", "a" * 200 + ".x",
             "\x01ctl", "tab\tname", "colon:semi;"]
    for n in names:
        (fs.root / n).write_text(n)
    assert sorted(os.listdir(fs.root)) == sorted(names)
    for n in names:
        assert (fs.root / n).read_text() == n
    raw = b"\xff\xfe-not-utf8"
    with open(os.path.join(os.fsencode(fs.root), raw), "wb") as f:
        f.write(b"raw")
    assert raw in os.listdir(os.fsencode(fs.root))


# --- directories ---------------------------------------------------------------------------


def test_mkdir_mode_exact(fs: Target, umask0: None) -> None:
    # (mkdir drops S_ISGID by definition: it is inherited from the parent, not requested.)
    for mode in (0o555, 0o700, 0o751, 0o1777, 0o000):
        p = fs.root / f"d{mode:o}"
        os.mkdir(p, mode)
        assert stat.S_IMODE(os.stat(p).st_mode) == mode, f"mkdir {mode:o}"
    # 0555 stays 0555 while it gets used: lookups inside do not change it.
    assert errname(lambda: os.stat(fs.root / "d555" / "x")) == "ENOENT"
    assert stat.S_IMODE(os.stat(fs.root / "d555").st_mode) == 0o555


def test_mkdir_mode_with_umask(fs: Target) -> None:
    old = os.umask(0o027)
    try:
        os.mkdir(fs.root / "d", 0o777)
        fd = os.open(fs.root / "f", os.O_CREAT | os.O_WRONLY, 0o666)
        os.close(fd)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(fs.root / "d").st_mode) == 0o750
    assert stat.S_IMODE(os.stat(fs.root / "f").st_mode) == 0o640


def test_create_mode_exact(fs: Target, umask0: None) -> None:
    for mode in (0o000, 0o444, 0o600, 0o755, 0o4755, 0o2711):
        p = fs.root / f"f{mode:o}"
        os.close(os.open(p, os.O_CREAT | os.O_WRONLY, mode))
        st = os.stat(p)
        assert stat.S_ISREG(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == mode, f"create {mode:o}"


def test_dir_nlink(fs: Target) -> None:
    r = fs.root
    os.mkdir(r / "a")
    assert os.stat(r / "a").st_nlink == 2
    for i in range(3):
        os.mkdir(r / "a" / f"s{i}")
    (r / "a" / "file").write_bytes(b"")  # files do not count
    assert os.stat(r / "a").st_nlink == 5
    os.rmdir(r / "a" / "s0")
    assert os.stat(r / "a").st_nlink == 4
    os.mkdir(r / "b")
    os.rename(r / "a" / "s1", r / "b" / "moved")
    assert os.stat(r / "a").st_nlink == 3
    assert os.stat(r / "b").st_nlink == 3
    assert os.stat(r / "b" / "moved").st_nlink == 2
    # The moved directory's ".." follows it.
    assert os.stat(r / "b" / "moved" / "..").st_ino == os.stat(r / "b").st_ino


def test_readdir_lists_everything(fs: Target) -> None:
    r = fs.root / "d"
    os.mkdir(r)
    names = {f"entry-{i:04d}" for i in range(500)}
    for n in names:
        (r / n).write_bytes(b"")
    os.mkdir(r / "subdir")
    os.symlink("x", r / "link")
    entries = {e.name: e for e in os.scandir(r)}
    assert set(entries) == names | {"subdir", "link"}
    assert entries["subdir"].is_dir(follow_symlinks=False)
    assert entries["link"].is_symlink()
    assert entries["entry-0001"].is_file(follow_symlinks=False)
    assert entries["entry-0001"].inode() == os.stat(r / "entry-0001").st_ino


def test_dot_and_dotdot(fs: Target) -> None:
    os.mkdir(fs.root / "d")
    assert os.stat(f"{fs.root}/d/.").st_ino == os.stat(fs.root / "d").st_ino
    assert os.stat(fs.root / "d" / "..").st_ino == os.stat(fs.root).st_ino
    # pathlib would fold "d/." into "d", so build the path as a string.
    assert errname(lambda: os.rmdir(f"{fs.root}/d/.")) == "EINVAL"


# --- hard links ----------------------------------------------------------------------------


def test_hard_links(fs: Target) -> None:
    r = fs.root
    (r / "a").write_bytes(b"shared")
    os.mkdir(r / "d")
    os.link(r / "a", r / "d" / "b")
    sa, sb = os.stat(r / "a"), os.stat(r / "d" / "b")
    assert sa.st_ino == sb.st_ino
    assert sa.st_nlink == sb.st_nlink == 2
    with open(r / "d" / "b", "r+b") as f:
        f.write(b"SHARED, longer")
    assert (r / "a").read_bytes() == b"SHARED, longer"
    assert os.stat(r / "a").st_size == len(b"SHARED, longer")
    os.unlink(r / "a")
    assert os.stat(r / "d" / "b").st_nlink == 1
    assert (r / "d" / "b").read_bytes() == b"SHARED, longer"


def test_hard_link_to_directory_refused(fs: Target) -> None:
    os.mkdir(fs.root / "d")
    assert errname(lambda: os.link(fs.root / "d", fs.root / "d2")) == "EPERM"


def test_st_size_right_after_link(fs: Target) -> None:
    bs = fs.block_size
    p = fs.root / "f"
    fd = os.open(p, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"z" * (bs + 12345))
        os.link(p, fs.root / "g")
        assert os.stat(fs.root / "g").st_size == bs + 12345
        assert os.stat(fs.root / "g").st_nlink == 2
        os.write(fd, b"more")
        assert os.stat(fs.root / "g").st_size == bs + 12349
    finally:
        os.close(fd)
    assert (fs.root / "g").read_bytes() == b"z" * (bs + 12345) + b"more"


def test_link_count_of_many_links(fs: Target) -> None:
    (fs.root / "f").write_bytes(b"x")
    for i in range(20):
        os.link(fs.root / "f", fs.root / f"l{i}")
    assert os.stat(fs.root / "f").st_nlink == 21
    for i in range(0, 20, 2):
        os.unlink(fs.root / f"l{i}")
    assert os.stat(fs.root / "l1").st_nlink == 11


# --- symlinks ------------------------------------------------------------------------------


def test_symlink_basics(fs: Target) -> None:
    r = fs.root
    (r / "target").write_bytes(b"through link")
    os.symlink("target", r / "rel")
    os.symlink(str(r / "target"), r / "abs")
    assert os.readlink(r / "rel") == "target"
    assert (r / "rel").read_bytes() == b"through link"
    assert (r / "abs").read_bytes() == b"through link"
    st = os.lstat(r / "rel")
    assert stat.S_ISLNK(st.st_mode)
    assert st.st_size == len("target")
    assert stat.S_IMODE(st.st_mode) == 0o777
    os.symlink("nowhere", r / "dangling")
    assert errname(lambda: os.stat(r / "dangling")) == "ENOENT"
    assert errname(lambda: os.readlink(r / "target")) == "EINVAL"
    os.symlink("loop2", r / "loop1")
    os.symlink("loop1", r / "loop2")
    assert errname(lambda: os.stat(r / "loop1")) == "ELOOP"


@pytest.mark.parametrize("length", [1, 255, 256, 1000, 4095])
def test_symlink_target_lengths(fs: Target, length: int) -> None:
    target = ("t/" * length)[:length]
    os.symlink(target, fs.root / "s")
    assert os.readlink(fs.root / "s") == target
    assert os.lstat(fs.root / "s").st_size == length


def test_symlink_target_too_long(fs: Target) -> None:
    assert errname(lambda: os.symlink("x" * 4096, fs.root / "s")) == "ENAMETOOLONG"
    assert not os.path.lexists(fs.root / "s")


def test_lstat_readlink_keep_symlink_atime(fs: Target) -> None:
    s = fs.root / "s"
    os.symlink("target", s)
    atime_ns = 1_234_567_890_123_456_789
    mtime_ns = 1_234_567_000_987_654_321
    os.utime(s, ns=(atime_ns, mtime_ns), follow_symlinks=False)
    for _ in range(3):
        os.lstat(s)
        assert os.readlink(s) == "target"
        os.listdir(fs.root)
    st = os.lstat(s)
    assert st.st_atime_ns == atime_ns
    assert st.st_mtime_ns == mtime_ns


# --- rename --------------------------------------------------------------------------------


def test_rename_simple_and_across_dirs(fs: Target) -> None:
    r = fs.root
    os.makedirs(r / "a" / "deep")
    os.mkdir(r / "b")
    (r / "a" / "f").write_bytes(b"payload")
    ino = os.stat(r / "a" / "f").st_ino
    os.rename(r / "a" / "f", r / "a" / "g")
    os.rename(r / "a" / "g", r / "b" / "h")
    assert os.listdir(r / "a") == ["deep"]
    assert os.listdir(r / "b") == ["h"]
    assert (r / "b" / "h").read_bytes() == b"payload"
    assert os.stat(r / "b" / "h").st_ino == ino
    os.rename(r / "a" / "deep", r / "b" / "deep2")
    assert os.path.isdir(r / "b" / "deep2")


def test_rename_over_existing_file(fs: Target) -> None:
    r = fs.root
    (r / "src").write_bytes(b"new")
    (r / "dst").write_bytes(b"old content")
    held = os.open(r / "dst", os.O_RDONLY)
    try:
        os.rename(r / "src", r / "dst")
        assert (r / "dst").read_bytes() == b"new"
        assert not os.path.lexists(r / "src")
        # The replaced file lives on through its open handle, with no links left.
        assert os.pread(held, 100, 0) == b"old content"
        assert os.fstat(held).st_nlink == 0
    finally:
        os.close(held)


def test_rename_over_empty_and_nonempty_dir(fs: Target) -> None:
    r = fs.root
    os.mkdir(r / "src")
    (r / "src" / "inside").write_bytes(b"")
    os.mkdir(r / "empty")
    os.rename(r / "src", r / "empty")
    assert os.listdir(r / "empty") == ["inside"]
    os.mkdir(r / "other")
    assert errname(lambda: os.rename(r / "other", r / "empty")) == "ENOTEMPTY"


def test_rename_type_mismatches(fs: Target) -> None:
    r = fs.root
    os.mkdir(r / "d")
    (r / "f").write_bytes(b"")
    assert errname(lambda: os.rename(r / "f", r / "d")) == "EISDIR"
    assert errname(lambda: os.rename(r / "d", r / "f")) == "ENOTDIR"
    assert errname(lambda: os.rename(r / "d", r / "d" / "inside")) == "EINVAL"
    assert os.path.isdir(r / "d") and os.path.isfile(r / "f")


def test_rename_to_itself_and_between_links(fs: Target) -> None:
    r = fs.root
    (r / "f").write_bytes(b"x")
    os.rename(r / "f", r / "f")
    assert (r / "f").read_bytes() == b"x"
    os.link(r / "f", r / "g")
    # POSIX: renaming one link of a file onto another link of it does nothing.
    os.rename(r / "f", r / "g")
    assert sorted(os.listdir(r)) == ["f", "g"]
    assert os.stat(r / "f").st_nlink == 2


def test_rename_noreplace(fs: Target) -> None:
    r = fs.root
    (r / "a").write_bytes(b"a")
    (r / "b").write_bytes(b"b")
    assert errname(lambda: renameat2(r / "a", r / "b", RENAME_NOREPLACE)) == "EEXIST"
    assert (r / "a").read_bytes() == b"a" and (r / "b").read_bytes() == b"b"
    renameat2(r / "a", r / "c", RENAME_NOREPLACE)
    assert sorted(os.listdir(r)) == ["b", "c"]
    assert errname(lambda: renameat2(r / "missing", r / "z", RENAME_NOREPLACE)) == "ENOENT"


def test_rename_exchange(fs: Target) -> None:
    r = fs.root
    os.makedirs(r / "p1" / "dir")
    (r / "p1" / "dir" / "inner").write_bytes(b"")
    os.mkdir(r / "p2")
    (r / "p2" / "file").write_bytes(b"file data")
    dir_ino = os.stat(r / "p1" / "dir").st_ino
    file_ino = os.stat(r / "p2" / "file").st_ino
    renameat2(r / "p1" / "dir", r / "p2" / "file", RENAME_EXCHANGE)
    assert os.stat(r / "p1" / "dir").st_ino == file_ino
    assert os.stat(r / "p2" / "file").st_ino == dir_ino
    assert (r / "p1" / "dir").read_bytes() == b"file data"
    assert os.listdir(r / "p2" / "file") == ["inner"]
    # The directory moved from p1 to p2: link counts of both parents follow.
    assert os.stat(r / "p1").st_nlink == 2
    assert os.stat(r / "p2").st_nlink == 3
    assert os.stat(r / "p2" / "file" / "..").st_ino == os.stat(r / "p2").st_ino
    # Exchanging two files in one directory.
    (r / "x").write_bytes(b"X")
    (r / "y").write_bytes(b"Y")
    renameat2(r / "x", r / "y", RENAME_EXCHANGE)
    assert (r / "x").read_bytes() == b"Y" and (r / "y").read_bytes() == b"X"
    assert errname(lambda: renameat2(r / "x", r / "missing", RENAME_EXCHANGE)) == "ENOENT"
    assert errname(
        lambda: renameat2(r / "x", r / "y", RENAME_EXCHANGE | RENAME_NOREPLACE)
    ) == "EINVAL"


# --- unlinked but open ---------------------------------------------------------------------


def test_unlinked_open_file_stays_usable(fs: Target) -> None:
    bs = fs.block_size
    p = fs.root / "f"
    data = os.urandom(2 * bs + 5)
    p.write_bytes(data)
    fd = os.open(p, os.O_RDWR)
    try:
        os.unlink(p)
        assert not os.path.lexists(p)
        assert os.listdir(fs.root) == []
        assert os.fstat(fd).st_nlink == 0
        assert os.pread(fd, 3 * bs, 0) == data
        write_all(fd, b"after unlink", bs)
        os.fsync(fd)
        os.fdatasync(fd)
        os.ftruncate(fd, bs + 12)
        assert os.fstat(fd).st_size == bs + 12
        assert os.pread(fd, 3 * bs, 0) == data[:bs] + b"after unlink"
        # A new file of the same name is a different file.
        p.write_bytes(b"new")
        assert os.pread(fd, 5, bs) == b"after"
    finally:
        os.close(fd)
    assert p.read_bytes() == b"new"


def test_fsync_fdatasync_on_unlinked_file(fs: Target) -> None:
    p = fs.root / "f"
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"dirty data not yet flushed")
        os.unlink(p)
        os.fsync(fd)
        os.fdatasync(fd)
        os.write(fd, b" and more")
        os.fdatasync(fd)
        os.fsync(fd)
        assert os.pread(fd, 100, 0) == b"dirty data not yet flushed and more"
    finally:
        os.close(fd)


def test_fsync_directory(fs: Target) -> None:
    os.mkdir(fs.root / "d")
    fd = os.open(fs.root / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def test_unlinked_via_rename_and_hardlink_survivor(fs: Target) -> None:
    r = fs.root
    (r / "f").write_bytes(b"data")
    os.link(r / "f", r / "g")
    fd = os.open(r / "f", os.O_RDONLY)
    try:
        os.unlink(r / "f")
        assert os.fstat(fd).st_nlink == 1
        os.unlink(r / "g")
        assert os.fstat(fd).st_nlink == 0
        assert os.read(fd, 10) == b"data"
    finally:
        os.close(fd)
    assert os.listdir(r) == []


def test_open_errno_values(fs: Target) -> None:
    """Sanity of the errno mapping for a few combinations (no EPERM/EIO leaking)."""
    (fs.root / "f").write_bytes(b"")
    with pytest.raises(OSError) as e:
        os.open(fs.root / "f" / "x", os.O_RDONLY)
    assert e.value.errno == errno.ENOTDIR
