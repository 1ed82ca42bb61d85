"""A hostile unprivileged user of an `--allow-other` mount cannot grow the daemon without bound.

Issue 10: one 1-byte write at 2^40 used to add ~525 MiB of locked memory (a dense version
array), and xattrs and inodes were unlimited: any user of the mount could OOM-kill the daemon
and with it every key. Here `nobody` writes single bytes at 2^40, 2^50 and 2^62-1, then floods
xattrs and inodes; each flood must end with the documented errno, the daemon's VmRSS and VmLck
must stay within BOUND of their idle values, and root's files written before stay intact.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fs.helpers import run_as
from tests.mounting import Mounted, mount, unmount

MAX_INODES = 3000
BUDGET = 24 << 20
# What the daemon may grow by: its metadata budget, plus the allocator's and pyfuse3's own
# overhead for the requests of the flood (measured ~10-20 MiB on CPython 3.11).
BOUND = BUDGET + (40 << 20)

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
    assert got["inodes"] == [MAX_INODES - used - 4, "ENOSPC"]  # flood, sparse, x, y
    assert got["statfs"] == [MAX_INODES, 0]
    assert got["xattr flood"][1] == "ENOSPC" and got["xattr flood"][0] > 50
    for key in ("VmRSS", "VmLck"):
        grew = after[key] - idle[key]
        print(f"{key}: idle {idle[key] >> 20} MiB, after floods {after[key] >> 20} MiB (+{grew >> 20} MiB)")
        assert grew <= BOUND, f"{key} grew by {grew >> 20} MiB (bound {BOUND >> 20} MiB)"
    assert "event=limit_reached what=inodes" in open_mount.log_text()
    assert "event=limit_reached what=memory_budget" in open_mount.log_text()
    for name, data in keep.items():
        assert hashlib.sha256((root / name).read_bytes()).digest() == hashlib.sha256(data).digest()
        assert os.getxattr(root / name, "user.tag") == name.encode()
