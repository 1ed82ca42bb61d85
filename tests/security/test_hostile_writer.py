"""A hostile unprivileged user of an `--allow-other` mount cannot grow the daemon without bound.

Issue 10: one 1-byte write at 2^40 used to add ~525 MiB of locked memory (a dense version
array), and xattrs and inodes were unlimited: any user of the mount could OOM-kill the daemon
and with it every key. Here `nobody` writes single bytes at 2^40, 2^50 and 2^62-1, then floods
xattrs and inodes; each flood must end with the documented errno, the daemon's VmRSS and VmLck
must stay within the documented bound of their idle values, and root's files written before
stay intact.

Issue 24: the budget undercounted (a 512 MiB budget let the daemon grow 593 MiB), open handles
were not counted at all, and once the budget was spent nobody, root included, could create a
file. The flood at the default budget below mixes every kind of object, holds handles open from
12 processes, and then checks the bound, ENFILE for handles, and the owner's reserve.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scratchfs.limits import DEFAULT_MEMORY_BUDGET, DEFAULT_OWNER_RESERVE_PERCENT
from tests.fs.helpers import NOBODY, run_as
from tests.mounting import Mounted, mount, unmount

MAX_INODES = 3000
BUDGET = 24 << 20


def bound(budget: int) -> int:
    """What the daemon may grow by (docs/threat-model.md): the budget with the charges' error
    (within 10 %, measured per kind of object), plus a constant for the allocator's and pyfuse3's
    own overhead while serving the flood's requests."""
    return budget + budget // 10 + (16 << 20)

CHILD = r"""
import errno, os
def err(fn, *a):
    try:
        fn(*a)
        return "ok"
    except OSError as e:
        return errno.errorcode[e.errno]

fd = os.open("sparse", os.O_RDWR | os.O_CREAT, 0o600)
for off in (1 << 40, 1 << 50, (1 << 62) - 1):
    R[f"write {off}"] = os.pwrite(fd, b"Z", off)
    R[f"read {off}"] = os.pread(fd, 8, off - 7).hex()
R["hole far"] = os.pread(fd, 4096, 1 << 61) == bytes(4096)
R["size"] = os.fstat(fd).st_size
os.close(fd)

# xattr flood on one inode: per-inode count, then per-inode bytes
open("x", "w").close()
n = 0
while (r := err(os.setxattr, "x", f"user.n{n}", b"v")) == "ok":
    n += 1
R["xattrs per inode"] = [n, r]
open("y", "w").close()
n = 0
while (r := err(os.setxattr, "y", f"user.big{n}", b"b" * 65536)) == "ok":
    n += 1
R["xattr bytes per inode"] = [n, r]
R["xattr too big"] = err(os.setxattr, "y", "user.huge", b"b" * 65537)

# inode flood
n = 0
while (r := err(lambda i: os.close(os.open(f"f{i}", os.O_CREAT | os.O_WRONLY, 0o600)), n)) == "ok":
    n += 1
R["inodes"] = [n, r]
st = os.statvfs(".")
R["statfs"] = [st.f_files, st.f_ffree]
for i in range(0, 200):
    os.unlink(f"f{i}")

# xattr flood across many inodes: the memory budget ends it
n = 0
r = "ok"
for i in range(200, n_files := R["inodes"][0]):
    for k in range(3):
        r = err(os.setxattr, f"f{i}", f"user.k{k}", b"m" * 60000)
        if r != "ok":
            break
        n += 1
    if r != "ok":
        break
R["xattr flood"] = [n, r]
"""


def _status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmLck"):
            out[key] = int(value.split()[0]) * 1024
    return out


@pytest.fixture
def open_mount(tmp_path: Path) -> Iterator[Mounted]:
    """scratchfs --allow-other with small inode and memory limits, on the usual (ext4) backing:
    writes past its 16 TiB land in an overflow blob."""
    m = mount(
        tmp_path / "backing",
        tmp_path / "mnt",
        "--allow-other",
        "--max-inodes",
        str(MAX_INODES),
        "--memory-budget",
        str(BUDGET),
    )
    try:
        yield m
    finally:
        unmount(m)


def test_unprivileged_floods_stay_bounded(open_mount: Mounted) -> None:
    root = open_mount.mountpoint
    os.chmod(root, 0o755)
    keep = {f"keep{i}": os.urandom(300_000 + i) for i in range(3)}
    for name, data in keep.items():
        (root / name).write_bytes(data)
        os.setxattr(root / name, "user.tag", name.encode())
    flood = root / "flood"
    flood.mkdir(mode=0o777)
    os.chmod(flood, 0o777)
    idle = _status(open_mount.pid)

    got = run_as(flood, CHILD)

    after = _status(open_mount.pid)
    for off in (1 << 40, 1 << 50, (1 << 62) - 1):
        assert got[f"write {off}"] == 1
        assert got[f"read {off}"] == "00" * 7 + "5a"
    assert got["hole far"] is True
    assert got["size"] == 1 << 62
    assert got["xattrs per inode"] == [128, "ENOSPC"]
    assert got["xattr bytes per inode"] == [3, "ENOSPC"]  # 4 x 64 KiB + names > 256 KiB
    assert got["xattr too big"] == "E2BIG"
    used = 1 + 3  # the root directory, keep0..2
    reserved = MAX_INODES * DEFAULT_OWNER_RESERVE_PERCENT // 100  # the owner's, not nobody's
    assert got["inodes"] == [MAX_INODES - reserved - used - 4, "ENOSPC"]  # flood, sparse, x, y
    assert got["statfs"] == [MAX_INODES, reserved]  # FUSE has no f_favail: free counts the reserve
    assert got["xattr flood"][1] == "ENOSPC" and got["xattr flood"][0] > 50
    for key in ("VmRSS", "VmLck"):
        grew = after[key] - idle[key]
        print(f"{key}: idle {idle[key] >> 20} MiB, after floods {after[key] >> 20} MiB (+{grew >> 20} MiB)")
        assert grew <= bound(BUDGET), f"{key} grew by {grew >> 20} MiB (bound {bound(BUDGET) >> 20} MiB)"
    assert "event=limit_reached what=inodes" in open_mount.log_text()
    assert "event=limit_reached what=memory_budget" in open_mount.log_text()
    for name, data in keep.items():
        assert hashlib.sha256((root / name).read_bytes()).digest() == hashlib.sha256(data).digest()
        assert os.getxattr(root / name, "user.tag") == name.encode()


# --- the flood at the default budget ----------------------------------------------------------------
HOLDERS = 12  # processes holding handles open, as in issue 24
HANDLES_EACH = 1000

# Every kind of object the budget charges, with 255-byte and short names: files, hard links,
# symlinks, directories (empty and holding a file), xattrs, files truncated once (content engine),
# files with one byte written.
SMALL_OBJECTS = r"""
def long(prefix, i):
    return (prefix + str(i)).ljust(255, "x")
for i in range(KIND):
    os.close(os.open(long("f", i), os.O_CREAT | os.O_WRONLY, 0o644))
    os.close(os.open(f"s{i}", os.O_CREAT | os.O_WRONLY, 0o644))
    os.link(f"s{i}", long("l", i))
    os.link(f"s{i}", f"k{i}")
    os.symlink("t" * 64, long("y", i))
    os.mkdir(f"d{i}")
    os.close(os.open(f"d{i}/f", os.O_CREAT | os.O_WRONLY, 0o644))
    os.setxattr(f"s{i}", "user.short", b"v" * 16)
    os.setxattr(f"s{i}", "user." + "n" * 250, b"v" * 16)
    os.close(os.open(f"s{i}", os.O_WRONLY | os.O_TRUNC))  # makes its content engine
    fd = os.open(long("w", i), os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"x")  # a key and a cipher context
    os.close(fd)
R["small"] = "ok"
"""

# Fill what is left with the cheapest requests per byte, four 60,000-byte xattrs per file, in
# rounds that each stay well within run_as's time limit on a busy machine.
FILL = r"""
def create(path):
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
n = START
r = "ok"
while r == "ok" and n < START + 400:
    r = attempt(create, f"x{n}")
    k = 0
    while r == "ok" and k < 4:
        r = attempt(os.setxattr, f"x{n}", f"user.v{k}", b"m" * 60000)
        k += 1
    n += 1
R["fill"] = [n, r]
if r != "ok":
    # the last crumbs: empty files, then handles, until each is refused
    n = 0
    while (r := attempt(create, f"z{n}")) == "ok":
        n += 1
    R["create after"] = r
    R["mkdir after"] = attempt(os.mkdir, "late-dir")
    fds = []
    try:
        while len(fds) < 10000:
            fds.append(os.open("s0", os.O_RDONLY))
    except OSError as e:
        R["open after"] = [len(fds), errno.errorcode[e.errno]]
    for fd in fds:
        os.close(fd)
"""


HOLDER = r"""
import os, sys
os.chdir(sys.argv[1])
os.setgroups([])
os.setresgid({uid}, {uid}, {uid})
os.setresuid({uid}, {uid}, {uid})
fds = [os.open("s0", os.O_RDONLY) for _ in range({count})]
print(len(fds), flush=True)
sys.stdin.read()  # hold them until the test closes our stdin
"""


def _hold_handles(cwd: Path) -> list[subprocess.Popen[str]]:
    """Start HOLDERS processes as nobody, each holding HANDLES_EACH handles of one file."""
    script = HOLDER.format(uid=NOBODY, count=HANDLES_EACH)
    holders: list[subprocess.Popen[str]] = []
    try:
        for _ in range(HOLDERS):
            holders.append(
                subprocess.Popen(
                    [sys.executable, "-I", "-c", script, str(cwd)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        for p in holders:
            assert p.stdout is not None and p.stdout.readline().strip() == str(HANDLES_EACH)
    except BaseException:
        _release_handles(holders)
        raise
    return holders


def _release_handles(holders: list[subprocess.Popen[str]]) -> None:
    """End the holders (closing their stdin closes their handles), by PID if they hang."""
    for p in holders:
        if p.stdin is not None:
            p.stdin.close()
    for p in holders:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@pytest.fixture
def default_mount(tmp_path: Path) -> Iterator[Mounted]:
    """scratchfs --allow-other with every limit at its default (512 MiB budget, 5 % reserve)."""
    m = mount(tmp_path / "backing", tmp_path / "mnt", "--allow-other")
    try:
        yield m
    finally:
        unmount(m)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_flood_at_the_default_budget_leaves_the_owner_reserve(default_mount: Mounted) -> None:
    root = default_mount.mountpoint
    os.chmod(root, 0o755)
    keep = os.urandom(200_000)
    (root / "keep").write_bytes(keep)
    flood = root / "flood"
    flood.mkdir(mode=0o777)
    os.chmod(flood, 0o777)
    idle = _status(default_mount.pid)
    started = time.monotonic()

    small = run_as(flood, "KIND = 600\n" + SMALL_OBJECTS)
    assert small["small"] == "ok"
    holders = _hold_handles(flood)
    try:
        got: dict[str, Any] = {"fill": [0, "ok"]}
        while got["fill"][1] == "ok":
            got = run_as(flood, f"START = {got['fill'][0]}\n" + FILL)
        spent = _status(default_mount.pid)
        # The owner (the daemon's user, root here) still has its reserve: files, data, xattrs, opens.
        mine = root / "owner-after-flood"
        data = os.urandom(4 << 20)
        mine.write_bytes(data)
        os.setxattr(mine, "user.tag", b"mine")
        (root / "owner-dir").mkdir()
        with open(flood / "s0", "rb"):
            pass
        assert hashlib.sha256(mine.read_bytes()).digest() == hashlib.sha256(data).digest()
    finally:
        _release_handles(holders)
    # The holders' 12,000 handles are given back at release: room for nobody's files again.
    after_release = run_as(flood, 'R["create"] = attempt(lambda: os.close(os.open("freed", os.O_CREAT)))')
    elapsed = time.monotonic() - started

    nobodys_share = DEFAULT_MEMORY_BUDGET * (100 - DEFAULT_OWNER_RESERVE_PERCENT) // 100
    files, last = got["fill"]
    print(f"flood: {files} fill files, ended {last}, {elapsed:.0f} s")
    assert last == "ENOSPC" and files > 1000
    assert got["create after"] == "ENOSPC"
    assert got["mkdir after"] == "ENOSPC"
    # a few crumbs are left: creates need room for their tables to grow, a handle does not
    assert got["open after"][0] < 1000 and got["open after"][1] == "ENFILE"
    assert after_release["create"] == "ok"
    for key in ("VmRSS", "VmLck"):
        grew = spent[key] - idle[key]
        print(f"{key}: idle {idle[key] >> 20} MiB, budget spent {spent[key] >> 20} MiB (+{grew >> 20} MiB)")
        limit = bound(DEFAULT_MEMORY_BUDGET)
        assert grew <= limit, f"{key} grew by {grew >> 20} MiB (bound {limit >> 20} MiB)"
        # ... and the budget was really spent: the charges do not overcount by more than 10 % either.
        assert grew >= nobodys_share * 9 // 10, f"{key} grew by only {grew >> 20} MiB"
    assert (root / "keep").read_bytes() == keep
    assert "event=limit_reached what=memory_budget" in default_mount.log_text()
