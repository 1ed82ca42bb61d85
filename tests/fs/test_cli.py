"""The scratchfs command line: every refusal has its exit code, one line, and touches nothing.

Exit codes under test: 0 ok, 2 usage, 3 backing dir unusable, 4 mountpoint unusable,
5 FUSE unavailable, 7 not mounted. (1 internal error and 6 daemon failed to start have no
honest way to be provoked from outside.)
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from scratchfs.exitcodes import EXIT_BUSY
from scratchfs.keyholder import mountinfo
from tests.mounting import Mounted, is_mounted, mount, run_cli, unmount, wait_pid_gone

pytestmark = pytest.mark.usefixtures("scratchfs_only")

Snapshot = dict[str, tuple[int, int, int, str]]


def snapshot(root: Path) -> Snapshot:
    """Names, modes, sizes, mtimes and content hashes of everything below root (and root)."""
    out: Snapshot = {}
    if not os.path.lexists(root):
        return out
    paths = [root]
    if root.is_dir() and not root.is_symlink():
        paths += sorted(root.rglob("*"))
    for p in paths:
        st = os.lstat(p)
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
        out[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return out


def assert_refused(result: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    """Exit code as documented, one line on stderr starting 'scratchfs: ', no traceback."""
    err = result.stderr
    assert result.returncode == code, f"exit {result.returncode}, expected {code}: {err!r}"
    assert "Traceback" not in err and "Traceback" not in result.stdout
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("scratchfs: "), repr(err)
    for w in words:
        assert w.lower() in err.lower(), f"{w!r} not in {err!r}"


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """An empty backing dir and an empty mountpoint."""
    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    mnt.mkdir()
    return backing, mnt


def refused_mount(backing: Path, mnt: Path, code: int, *extra: str) -> None:
    """Mount must fail with *code* and change neither directory; no daemon may remain."""
    before = snapshot(backing), snapshot(mnt)
    pid_file = backing.parent / "refused.pid"
    result = run_cli("mount", str(backing), str(mnt), "--pid-file", str(pid_file), *extra)
    try:
        assert_refused(result, code)
        assert (snapshot(backing), snapshot(mnt)) == before, "a refused mount changed files"
        assert not pid_file.exists()
    finally:
        if pid_file.exists():  # a daemon started after all: end it by its PID
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)


# --- usage -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["mount"],
        ["mount", "/tmp/only-one"],
        ["mount", "/tmp/a", "/tmp/b", "--no-such-option"],
        ["mount", "/tmp/a", "/tmp/b", "--block-size", "abc"],
        ["mount", "/tmp/a", "/tmp/b", "--block-size", "1000"],
        ["mount", "/tmp/a", "/tmp/b", "--max-inodes", "lots"],
        ["mount", "/tmp/a", "/tmp/b", "--max-file-size", "0"],
        ["mount", "/tmp/a", "/tmp/b", "--memory-budget", "9E"],
        ["mount", "/tmp/a", "/tmp/b", "--profile", "fastest"],
        ["mount", "/tmp/a", "/tmp/b", "--spin-us", "-1"],
        ["mount", "/tmp/a", "/tmp/b", "--spin-us", "1001"],
        ["umount"],
        ["frobnicate"],
    ],
    ids=["none", "mount-no-args", "mount-one-arg", "unknown-option", "block-size-nan",
         "block-size-not-pow2", "max-inodes-nan", "max-file-size-zero", "memory-budget-too-big",
         "unknown-profile", "spin-negative", "spin-too-long", "umount-no-args", "unknown-command"],
)
def test_usage_errors(args: list[str]) -> None:
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    # Without any command the full help is acceptable; otherwise one line.
    if args:
        assert_refused(result, 2)


def test_same_dir_for_backing_and_mountpoint(dirs: tuple[Path, Path]) -> None:
    backing, _ = dirs
    refused_mount(backing, backing, 2)


@pytest.mark.parametrize("args", [["--help"], ["mount", "--help"], ["umount", "--help"]])
def test_help(args: list[str]) -> None:
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout.lower()
    assert result.stderr == ""


# --- backing directory -----------------------------------------------------------------------


def test_backing_missing(dirs: tuple[Path, Path]) -> None:
    backing, mnt = dirs
    backing.rmdir()
    refused_mount(backing, mnt, 3)
    assert not backing.exists(), "a missing backing dir must not be created"


def test_backing_not_a_directory(dirs: tuple[Path, Path]) -> None:
    backing, mnt = dirs
    backing.rmdir()
    backing.write_bytes(b"a file")
    refused_mount(backing, mnt, 3)
    assert backing.read_bytes() == b"a file"


@pytest.mark.parametrize("foreign", ["notes.txt", "subdir", ".hidden", "0123456789abcdef0123456789abcdef"])
def test_backing_with_foreign_files(dirs: tuple[Path, Path], foreign: str) -> None:
    backing, mnt = dirs
    if foreign == "subdir":
        (backing / foreign).mkdir()
        (backing / foreign / "precious").write_bytes(b"keep me")
    else:
        (backing / foreign).write_bytes(b"someone else's data")
    refused_mount(backing, mnt, 3)
    assert not (backing / ".scratchfs").exists()


def test_backing_foreign_file_next_to_marker(tmp_path: Path) -> None:
    """A real store that someone dropped a file into is refused as well, and left alone."""
    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    m = mount(backing, mnt)
    unmount(m)
    assert sorted(os.listdir(backing)) == [".scratchfs"]
    (backing / "notes.txt").write_bytes(b"not ours")
    refused_mount(backing, mnt, 3)


# --- mountpoint ------------------------------------------------------------------------------


def test_mountpoint_missing(dirs: tuple[Path, Path]) -> None:
    backing, mnt = dirs
    mnt.rmdir()
    refused_mount(backing, mnt, 4)
    assert not mnt.exists()


def test_mountpoint_not_a_directory(dirs: tuple[Path, Path]) -> None:
    backing, mnt = dirs
    mnt.rmdir()
    mnt.write_bytes(b"file")
    refused_mount(backing, mnt, 4)


def test_mountpoint_not_empty(dirs: tuple[Path, Path]) -> None:
    backing, mnt = dirs
    (mnt / "occupied").write_bytes(b"x")
    refused_mount(backing, mnt, 4)


def test_mountpoint_already_mounted(tmp_path: Path, mount_factory: Callable[..., Mounted]) -> None:
    live = mount_factory()
    (live.mountpoint / "f").write_bytes(b"still here")
    other = tmp_path / "other-backing"
    other.mkdir()
    before = snapshot(other)
    result = run_cli("mount", str(other), str(live.mountpoint))
    assert_refused(result, 4)
    assert snapshot(other) == before
    assert (live.mountpoint / "f").read_bytes() == b"still here"


# --- FUSE unavailable ------------------------------------------------------------------------


def test_dev_fuse_missing(dirs: tuple[Path, Path]) -> None:
    """In a private mount namespace whose /dev lacks fuse."""
    backing, mnt = dirs
    before = snapshot(backing), snapshot(mnt)
    pid_file = backing.parent / "nofuse.pid"
    script = 'mount -t tmpfs -o mode=0755 none /dev && exec "$@"'
    cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh",
           sys.executable, "-m", "scratchfs", "mount", str(backing), str(mnt),
           "--pid-file", str(pid_file)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    try:
        assert_refused(result, 5, "/dev/fuse")
        assert (snapshot(backing), snapshot(mnt)) == before
    finally:
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), signal.SIGTERM)


def test_fusermount3_missing_for_non_root(tmp_path: Path) -> None:
    """A non-root user needs fusermount3; without it on PATH the refusal is exit 5."""
    # The child imports everything while root (the interpreter lives below /root), then
    # drops to uid 65534 with an empty PATH and runs the CLI's main().
    code = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {os.getcwd()!r})
        from scratchfs import cli
        cli.build_parser()
        os.environ["PATH"] = {str(tmp_path / "empty-bin")!r}
        os.setgroups([])
        os.setresgid(65534, 65534, 65534)
        os.setresuid(65534, 65534, 65534)
        sys.exit(cli.main(["mount", "/nonexistent-b", "/nonexistent-m"]))
    """)
    (tmp_path / "empty-bin").mkdir()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=False)
    assert_refused(result, 5, "fusermount3")


# --- umount ----------------------------------------------------------------------------------


def test_umount_not_mounted(dirs: tuple[Path, Path]) -> None:
    _, mnt = dirs
    (mnt / "f").write_bytes(b"x")
    before = snapshot(mnt)
    assert_refused(run_cli("umount", str(mnt)), 7)
    assert snapshot(mnt) == before


def test_umount_refuses_other_filesystems(tmp_path: Path) -> None:
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mnt)], check=True)
    try:
        assert_refused(run_cli("umount", str(mnt)), 7)
        assert is_mounted(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# mountinfo writes space, tab, newline and backslash as \ooo escapes and UTF-8 raw: such a
# mount point must still be found mounted, then stale, then cleared.
@pytest.mark.parametrize("name", ["mnt", "mnt ü\\ß x"])
def test_umount_clears_stale_mount_and_remount_wipes(tmp_path: Path, name: str) -> None:
    backing, mnt = tmp_path / "backing", tmp_path / name
    m = mount(backing, mnt)
    try:
        assert is_mounted(mnt)
        if name != "mnt":  # a clean unmount and remount of the odd name first
            unmount(m)
            assert not is_mounted(mnt)
            m = mount(backing, mnt)
        (mnt / "f").write_bytes(b"data that must not survive" * 1000)
        os.sync()
        assert m.blobs()
        os.kill(m.pid, signal.SIGKILL)
        assert wait_pid_gone(m.pid)
        assert is_mounted(mnt) and mountinfo.is_stale(mnt)
        # A stale mount is not a usable mountpoint.
        refused = run_cli("mount", str(backing), str(mnt))
        assert_refused(refused, 4)
        result = run_cli("umount", str(mnt))
        assert result.returncode == 0, result.stderr
        assert not is_mounted(mnt)
        assert m.blobs(), "leftovers of the killed daemon are expected until the next mount"
        # The next mount on this store wipes the undecryptable leftovers.
        m2 = mount(backing, mnt)
        try:
            assert m2.blobs() == []
            assert os.listdir(mnt) == []
        finally:
            unmount(m2)
        assert sorted(os.listdir(backing)) == [".scratchfs"]
    finally:
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)


def test_mount_and_umount_exit_zero(dirs: tuple[Path, Path]) -> None:
    backing, mnt = dirs
    pid_file = backing.parent / "ok.pid"
    result = run_cli("mount", str(backing), str(mnt), "--pid-file", str(pid_file))
    try:
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        assert is_mounted(mnt)
        pid = int(pid_file.read_text())
    finally:
        done = run_cli("umount", str(mnt))
    assert done.returncode == 0, done.stderr
    assert not is_mounted(mnt)
    assert wait_pid_gone(pid)


def test_umount_ends_copies_held_by_other_mount_namespaces(tmp_path: Path) -> None:
    """A private mount namespace made while the mount is live keeps a copy of it; umount ends it.

    The copy outlives our unmount and held the daemon (and the plaintext) until umount learned
    to abort the connection through fusectl.
    """
    m = mount(tmp_path / "backing", tmp_path / "mnt")
    (m.mountpoint / "secret").write_bytes(b"plaintext")
    holder = subprocess.Popen(["unshare", "--mount", "--propagation=private", "sleep", "120"], stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # unshare execs sleep once its namespace is set up
            if os.readlink(f"/proc/{holder.pid}/exe").endswith("sleep"):
                break
            time.sleep(0.02)
        copy = Path(f"/proc/{holder.pid}/root{m.mountpoint}/secret")
        assert copy.read_bytes() == b"plaintext"
        done = run_cli("umount", str(m.mountpoint))
        assert done.returncode == 0, done.stderr
        assert wait_pid_gone(m.pid, 30), "the daemon kept serving the other namespace's copy"
        assert "ended its FUSE connection" in done.stderr
        assert str(holder.pid) in done.stderr
        with pytest.raises(OSError) as seen:
            copy.read_bytes()
        assert seen.value.errno in mountinfo.STALE_ERRNOS
    finally:
        holder.kill()
        holder.wait(10)
        if is_mounted(m.mountpoint):
            unmount(m)


def test_umount_names_a_bind_mount_it_leaves(tmp_path: Path) -> None:
    m = mount(tmp_path / "backing", tmp_path / "mnt")
    other = tmp_path / "bound"
    other.mkdir()
    subprocess.run(["mount", "--bind", str(m.mountpoint), str(other)], check=True)
    try:
        done = run_cli("umount", str(m.mountpoint))
        assert done.returncode == EXIT_BUSY
        assert f"still mounted at {other}" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
        assert is_mounted(other) and not is_mounted(m.mountpoint)
    finally:
        if is_mounted(other):
            subprocess.run(["umount", str(other)], check=False)
        assert wait_pid_gone(m.pid, 30)
        if is_mounted(m.mountpoint):
            unmount(m)


def test_umount_busy_names_who_holds_it(tmp_path: Path) -> None:
    m = mount(tmp_path / "backing", tmp_path / "mnt")
    inside = subprocess.Popen(["sleep", "60"], cwd=m.mountpoint)
    try:
        done = run_cli("umount", str(m.mountpoint))
        assert done.returncode == EXIT_BUSY
        assert f"{inside.pid} (sleep)" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    finally:
        inside.kill()
        inside.wait(10)
        unmount(m)
