"""Bounds on what a writer can make the daemon allocate (no mount): sparse block versions,
inode and xattr limits, the memory budget and its accounting."""

from __future__ import annotations

import errno
import itertools
import os
import random
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from scratchfs import blocks
from scratchfs.content import DENSE_SLACK, FileContent
from scratchfs.errors import FsError, IntegrityError
from scratchfs.limits import (
    CONTENT_COST,
    DICT_MODEL_EXACT,
    FAR_VERSION_COST,
    MAX_LFS_FILESIZE,
    Limits,
    MemoryBudget,
    appended_after,
    dict_growth,
    owner_request,
)
from scratchfs.store import BlobStore
from scratchfs.tree import ROOT_INO, Namespace

BS = 16384


@pytest.fixture
def store() -> Iterator[BlobStore]:
    """A store on tmpfs: its blobs may be as large as the kernel allows (sparse), like the mount's."""
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        s = BlobStore.open(Path(d))
        yield s
        s.close()


@pytest.mark.parametrize("offset", [1 << 40, 1 << 50, (1 << 62) - 1])
def test_far_write_costs_one_entry_and_reads_back(store: BlobStore, offset: int) -> None:
    budget = MemoryBudget(1 << 30)
    c = FileContent(store, BS, budget)
    c.write(0, b"head")
    c.write(offset, b"x")
    assert c.size == offset + 1
    assert len(c.versions) == 1 and len(c.far) == 1, "a far block must not grow the dense array"
    assert budget.used <= CONTENT_COST + 8 * 16 + FAR_VERSION_COST
    assert bytes(c.read(offset, 1)) == b"x"
    assert bytes(c.read(0, 4)) == b"head"
    # holes anywhere read as zeros, including the far block's own hole part and just below it
    assert bytes(c.read(offset - 5, 6)) == bytes(5) + b"x"
    assert bytes(c.read(offset // 2, 1 << 20)) == bytes(1 << 20)
    assert bytes(c.read(1 << 20, 100)) == bytes(100)
    assert c.st_blocks == (2 * BS) // 512
    c.truncate(5)
    assert len(c.far) == 0 and c.allocated == 1
    assert bytes(c.read(0, 10)) == b"head\0"
    c.destroy()
    assert budget.used == 0


def test_read_near_the_kernel_limit_is_zeros(store: BlobStore) -> None:
    c = FileContent(store, BS)
    c.write(0, b"a")
    c.truncate(MAX_LFS_FILESIZE)  # a size only: no version, no blob growth
    assert len(c.far) == 0
    assert bytes(c.read(MAX_LFS_FILESIZE - 4096, 8192)) == bytes(4096)
    c.destroy()


def test_near_blocks_stay_in_the_dense_array_and_far_ones_move_in(store: BlobStore) -> None:
    c = FileContent(store, 512)
    c.write(0, b"a" * 512)
    c.write(512 * (1 + DENSE_SLACK), b"b")  # within the slack: array grows
    assert not c.far
    far = 512 * (3 * DENSE_SLACK)
    c.write(far, b"c")
    assert list(c.far) == [3 * DENSE_SLACK]
    for i in range(2 + DENSE_SLACK, 3 * DENSE_SLACK + DENSE_SLACK // 2, DENSE_SLACK // 2):  # across it
        c.write(512 * i, b"d")
    assert not c.far, "a far block the array reaches moves into it"
    assert bytes(c.read(far, 1)) == b"c"
    c.destroy()


def test_budget_refuses_before_anything_changes(store: BlobStore) -> None:
    budget = MemoryBudget(CONTENT_COST + 200)
    c = FileContent(store, 512, budget)
    c.write(0, b"a")
    with pytest.raises(FsError) as e:
        c.write(512 * 10_000, b"z" * 512 * 4)  # 4 far blocks: 4 x 104 bytes > what is left
    assert e.value.errno == errno.ENOSPC
    assert c.size == 1 and not c.far
    c.write(512 * 10_000, b"z")  # one entry fits
    assert bytes(c.read(512 * 10_000, 1)) == b"z"
    c.destroy()
    assert budget.used == 0


@pytest.mark.parametrize("bs", [512, 4096])
def test_overflow_blob_matches_model(store: BlobStore, bs: int) -> None:
    """Blocks past what the backing store holds go to the overflow blob: same bytes as a model."""
    rng = random.Random(bs)
    store.size_limit = 6 * (bs + blocks.OVERHEAD) + 7  # the main blob holds blocks 0..5
    c = FileContent(store, bs)
    assert c.ident_blocks == 6
    model = bytearray()
    for _ in range(400):
        op = rng.random()
        if op < 0.6:
            off = rng.randrange(0, 14 * bs)
            data = rng.randbytes(rng.randrange(1, 3 * bs))
            c.write(off, data)
            if off > len(model):
                model.extend(bytes(off - len(model)))
            model[off : off + len(data)] = data
        elif op < 0.75:
            size = rng.randrange(0, 16 * bs)
            c.truncate(size)
            if size < len(model):
                del model[size:]
            else:
                model.extend(bytes(size - len(model)))
        elif op < 0.8:
            c.close_fd()  # reopen both blobs (pinned) on next use
        else:
            off = rng.randrange(0, 17 * bs)
            n = rng.randrange(0, 4 * bs)
            assert bytes(c.read(off, n)) == bytes(model[off : off + n])
        assert c.size == len(model)
        written = {i for i in range(6, 20) if c._version(i)}
        assert set(c.slots) == written, "a slot for every overflow block, nothing else"
        assert os.path.getsize(store.root / c.blob_id.hex()) <= store.size_limit if c.blob_id else True
    assert bytes(c.read(0, len(model))) == bytes(model)
    slots_used = c.next_slot
    assert slots_used <= 8 + 3 * 400 // 5, "freed slots are reused"
    c.destroy()
    assert [p.name for p in store.root.iterdir()] == [".scratchfs"]


def test_overflow_record_moved_between_slots_is_refused(store: BlobStore) -> None:
    store.size_limit = 2 * (512 + blocks.OVERHEAD)
    c = FileContent(store, 512)
    c.write(512 * 10, b"a" * 512)
    c.write(512 * 11, b"b" * 512)
    assert c.ovf_id is not None
    ovf = store.root / c.ovf_id.hex()
    raw = ovf.read_bytes()
    rec = 512 + blocks.OVERHEAD
    ovf.write_bytes(raw[rec : 2 * rec] + raw[:rec])  # swap the two slots (same inode: write_bytes)
    with pytest.raises(IntegrityError):
        c.read(512 * 10, 512)
    c.destroy()


def test_inode_limit_gives_enospc_and_frees_on_unlink() -> None:
    ns = Namespace(limits=Limits(max_inodes=4))
    for i in range(3):
        ns.create(ROOT_INO, b"f%d" % i, stat.S_IFREG | 0o644, 0, 0)
    with pytest.raises(FsError) as e:
        ns.create(ROOT_INO, b"one-too-many", stat.S_IFREG | 0o644, 0, 0)
    assert e.value.errno == errno.ENOSPC
    node = ns.unlink(ROOT_INO, b"f0")
    assert ns.release_if_unused(node) is node
    ns.create(ROOT_INO, b"again", stat.S_IFREG | 0o644, 0, 0)


def test_budget_accounting_returns_to_idle() -> None:
    ns = Namespace()
    # The root directory's tables are charged as sized and a dict keeps its table when emptied:
    # give them their first table before taking the idle figure.
    ns.create(ROOT_INO, b"warm", stat.S_IFREG | 0o644, 0, 0)
    ns.release_if_unused(ns.unlink(ROOT_INO, b"warm"))
    idle = ns.budget.used
    d = ns.create(ROOT_INO, b"dir", stat.S_IFDIR | 0o755, 0, 0)
    f = ns.create(d.ino, b"file", stat.S_IFREG | 0o644, 0, 0)
    ns.link(f.ino, ROOT_INO, b"a-longer-second-name")
    ns.create(ROOT_INO, b"sym", stat.S_IFLNK | 0o777, 0, 0, target=b"/somewhere/else")
    ns.setxattr(f, b"user.a", b"v" * 1000)
    ns.setxattr(f, b"user.a", b"v" * 10)
    ns.rename(ROOT_INO, b"a-longer-second-name", d.ino, b"n", 0)
    ns.rename(ROOT_INO, b"sym", d.ino, b"file", 0)  # replaces one of f's names
    assert ns.budget.used > idle
    for parent, name in ((d.ino, b"n"), (d.ino, b"file")):
        node = ns.unlink(parent, name)
        ns.release_if_unused(node)
    ns.release_if_unused(ns.rmdir(ROOT_INO, b"dir"))
    assert ns.budget.used == idle


def test_memory_budget_caps_inodes() -> None:
    ns = Namespace(limits=Limits(memory_budget=20_000))
    made = 0
    with pytest.raises(FsError) as e:
        for i in range(1000):
            ns.create(ROOT_INO, b"f%d" % i, stat.S_IFREG | 0o644, 0, 0)
            made += 1
    assert e.value.errno == errno.ENOSPC
    assert 10 < made < 40
    assert ns.budget.used <= 20_000


def test_xattr_count_and_bytes_limits() -> None:
    ns = Namespace(limits=Limits(max_xattrs=3, max_xattr_bytes=1000))
    f = ns.create(ROOT_INO, b"f", stat.S_IFREG | 0o644, 0, 0)
    for i in range(3):
        ns.setxattr(f, b"user.%d" % i, b"v")
    with pytest.raises(FsError) as e:
        ns.setxattr(f, b"user.3", b"v")
    assert e.value.errno == errno.ENOSPC
    ns.setxattr(f, b"user.0", b"w" * 900)  # replacing a value is not a new xattr
    with pytest.raises(FsError) as e:
        ns.setxattr(f, b"user.1", b"w" * 100)  # 900 + 100 + names > 1000
    assert e.value.errno == errno.ENOSPC
    ns.removexattr(f, b"user.0")
    ns.setxattr(f, b"user.1", b"w" * 100)
    assert f.xattrs is not None and f.xattrs[b"user.1"] == b"w" * 100
    with pytest.raises(FsError) as e:
        ns.removexattr(f, b"user.0")
    assert e.value.errno == errno.ENODATA


def test_check_runs_lists_written_blocks_and_backing_data(store: BlobStore) -> None:
    c = FileContent(store, 512)
    c.write(0, b"a" * 1024)  # blocks 0-1
    c.write(512 * 5, b"b")  # block 5 (dense, within the slack)
    c.write(512 * 100_000, b"c" * 1024)  # blocks 100000-100001 (far)
    c.truncate(512 * 200_000)
    c.ready()
    runs = list(c.check_runs(0))

    def covered(index: int, runs: list[tuple[int, int]]) -> bool:
        return any(first <= index <= last for first, last in runs)

    assert all(covered(i, runs) for i in (0, 1, 5, 100_000, 100_001))
    # SEEK_DATA answers in 4 KiB pages (~8 records of 540 bytes): a few neighbours, never the holes
    assert sum(last - first + 1 for first, last in runs) <= 3 * 16, runs
    assert runs == sorted(runs) and all(a[1] + 1 < b[0] for a, b in itertools.pairwise(runs))
    assert next(iter(c.check_runs(50)))[0] >= 100_000 - 8  # starting later skips what is before
    # bytes planted in a hole's record area show up, so a check reads (and catches) them
    assert c.blob_id is not None
    path = store.root / c.blob_id.hex()
    with open(path, "r+b") as f:
        f.seek(blocks.record_offset(50_000, 512))
        f.write(b"planted")
    assert any(first <= 50_000 <= last for first, last in c.check_runs(0))
    c.destroy()


def test_overflow_write_failing_for_space_changes_nothing(tmp_path: Path) -> None:
    """ENOSPC half-way through a run into the overflow blob: no block takes a new version, the
    taken slots are given back, what was there reads back unchanged (a real full tmpfs)."""
    where = tmp_path / "small"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(where)], check=True)
    try:
        store = BlobStore.open(where)
        store.size_limit = 2 * (4096 + blocks.OVERHEAD)
        c = FileContent(store, 4096)
        c.write(0, b"k" * 8192)
        c.write(4096 * 10, b"o" * 4096)  # one overflow block
        before = (dict(c.slots), dict(c.far), c.size, c.next_slot)
        with pytest.raises(OSError) as e:
            c.write(4096 * 10, os.urandom(4096 * 100))  # 400 KiB into a 256 KiB filesystem
        assert e.value.errno == errno.ENOSPC
        assert (dict(c.slots), dict(c.far), c.size) == before[:3]
        assert bytes(c.read(4096 * 10, 4096)) == b"o" * 4096
        assert bytes(c.read(0, 8192)) == b"k" * 8192
        assert len(c.free_slots) == c.next_slot - 1, "every slot taken by the failed write is free again"
        c.destroy()
        store.close()
    finally:
        subprocess.run(["umount", str(where)], check=True)


def _as_owner(fn: Callable[[], object]) -> object:
    token = owner_request.set(True)
    try:
        return fn()
    finally:
        owner_request.reset(token)


def _fill(ns: Namespace, prefix: bytes, parent: int = ROOT_INO) -> int:
    """Create files in *parent* until ENOSPC; returns how many were made."""
    made = 0
    with pytest.raises(FsError) as e:
        while True:
            ns.create(parent, b"%s%d" % (prefix, made), stat.S_IFREG | 0o644, 65534, 65534)
            made += 1
            assert ns.budget.used <= ns.budget.limit
    assert e.value.errno == errno.ENOSPC
    return made


def test_owner_reserve_of_the_budget() -> None:
    ns = Namespace(limits=Limits(memory_budget=1 << 20, owner_reserve_percent=10))
    # The owner's own directory: a resize of the crowded one may need more than the reserve.
    home = ns.create(ROOT_INO, b"home", stat.S_IFDIR | 0o755, 0, 0).ino
    others = _fill(ns, b"nobody")
    assert ns.budget.used <= ns.budget.limit - ns.budget.owner_reserve
    assert ns.budget.limit - ns.budget.owner_reserve - ns.budget.used < 64 << 10  # the rest was spent
    mine = _as_owner(lambda: _fill(ns, b"owner", home))
    # 10 % of the budget, plus what the crowded directory's next resize left unused
    assert isinstance(mine, int) and others // 12 < mine < others // 4
    assert ns.budget.used <= ns.budget.limit


def test_owner_reserve_of_the_inodes() -> None:
    ns = Namespace(limits=Limits(max_inodes=100, owner_reserve_percent=10))
    assert _fill(ns, b"nobody") == 100 - 10 - 1  # the root directory is one
    assert _as_owner(lambda: _fill(ns, b"owner")) == 10


def test_rename_to_a_longer_name_is_charged_first() -> None:
    ns = Namespace(limits=Limits(memory_budget=64 << 10, owner_reserve_percent=0))
    # into another directory: renaming within the crowded one may need its whole next table
    other = ns.create(ROOT_INO, b"d", stat.S_IFDIR | 0o755, 0, 0).ino
    made = _fill(ns, b"f")
    for i in range(made - 3, made):  # room for a few longer names
        ns.release_if_unused(ns.unlink(ROOT_INO, b"f%d" % i))
    renamed = 0
    with pytest.raises(FsError) as e:
        for renamed in range(made):
            ns.rename(ROOT_INO, b"f%d" % renamed, other, b"%d" % renamed + b"n" * 250, 0)
            assert ns.budget.used <= ns.budget.limit
    assert e.value.errno == errno.ENOSPC
    assert 0 < renamed < 60  # each takes ~240 bytes more of the ~3 KiB freed and what was left
    assert ns.lookup(ROOT_INO, b"f%d" % renamed)  # the refused rename changed nothing


def test_dict_growth_predicts_every_resize() -> None:
    assert DICT_MODEL_EXACT, "dict layout unknown: dict_growth falls back to doubling headroom"
    rng = random.Random(7)
    table: dict[object, object] = {}
    appended = 0
    live: list[int] = []
    for i in range(20000):
        due = dict_growth(table, appended)
        before = sys.getsizeof(table)
        table[i] = None
        live.append(i)
        after = sys.getsizeof(table)
        assert (after != before) == (due > 0), i
        assert not due or after == due, i
        appended = appended_after(table, before, appended)
        if rng.random() < 0.4:
            del table[live.pop(rng.randrange(len(live)))]


def test_a_table_resize_never_passes_the_budget() -> None:
    # 1M-entry tables grow by tens of MiB in one step; here the directory's and the inode
    # table's last resize must be refused rather than taken past the limit.
    for budget in (200_000, 1_000_000, 3_000_000):
        ns = Namespace(limits=Limits(memory_budget=budget, owner_reserve_percent=0, max_inodes=10**7))
        _fill(ns, b"")
        assert ns.budget.used <= budget


# Charges against the real memory of the same structures, in a fresh interpreter (RSS per object
# over N objects, fresh int and bytes objects as pyfuse3 hands them to us).
COST_PROBE = r"""
import os, stat, sys
from scratchfs.limits import Limits
from scratchfs.tree import Namespace, ROOT_INO
kind, n = sys.argv[1], int(sys.argv[2])
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))
def name(i, long):
    s = b"%d" % i
    return bytes(bytearray(s.ljust(255, b"x") if long else b"n" + s))
def fresh(v):
    return int(str(v))
ns = Namespace(limits=Limits(max_inodes=10**8, memory_budget=1 << 45))
d = ns.create(ROOT_INO, b"d", stat.S_IFDIR | 0o777, 0, 0)
t = ns.create(d.ino, b"t", stat.S_IFREG | 0o666, 0, 0)
long = kind.endswith("255")
REG, DIR, LNK = stat.S_IFREG | 0o644, stat.S_IFDIR | 0o755, stat.S_IFLNK | 0o777
hosts = [ns.create(d.ino, name(i, False), REG, 0, 0) for i in range(n // 100)] if kind.startswith("xattr") else []
real, charged = rss(), ns.budget.used
for i in range(n):
    if kind.startswith("file"):
        ns.remember(ns.create(fresh(d.ino), name(i, long), fresh(REG), fresh(65534), fresh(65534)))
    elif kind.startswith("link"):
        ns.link(fresh(t.ino), fresh(d.ino), name(i, long))
    elif kind.startswith("symlink"):
        ns.create(fresh(d.ino), name(i, long), fresh(LNK), fresh(65534), fresh(65534), target=name(i, True)[:64])
    elif kind.startswith("dir"):
        sub = ns.create(fresh(d.ino), name(i, long), fresh(DIR), fresh(65534), fresh(65534))
        if kind == "dir_with_file":
            ns.create(fresh(sub.ino), name(0, False), fresh(REG), fresh(65534), fresh(65534))
    else:
        key = (b"user.%d" % (i % 100)).ljust(255 if long else 8, b"k")
        ns.setxattr(hosts[i // 100], bytes(bytearray(key)), bytes(bytearray(b"v" * 16)))
print(rss() - real, ns.budget.used - charged)
"""


@pytest.mark.parametrize(
    "kind",
    ["file", "file_255", "link", "link_255", "symlink", "symlink_255", "dir", "dir_255", "dir_with_file",
     "xattr", "xattr_255"],
)
def test_charges_match_real_memory_within_ten_percent(kind: str) -> None:
    n = 150_000 if kind.startswith("xattr") else 60_000  # xattrs are small: more of them for a steady figure
    out = subprocess.run(
        [sys.executable, "-c", COST_PROBE, kind, str(n)], capture_output=True, text=True, timeout=120, check=True
    ).stdout.split()
    real, charged = int(out[0]), int(out[1])
    print(f"{kind}: real {real / n:.0f} B, charged {charged / n:.0f} B per object")
    assert 0.9 <= charged / real <= 1.1, f"{kind}: charged {charged / n:.0f} B, real {real / n:.0f} B per object"


def test_owner_reserve_option() -> None:
    from scratchfs.cli import UsageError, build_parser

    parser = build_parser()
    assert parser.parse_args(["mount", "b", "m"]).owner_reserve == 5
    assert parser.parse_args(["mount", "b", "m", "--owner-reserve", "0"]).owner_reserve == 0
    assert parser.parse_args(["mount", "b", "m", "--owner-reserve", "12%"]).owner_reserve == 12
    for bad in ("51", "-1", "five"):
        with pytest.raises(UsageError) as e:
            parser.parse_args(["mount", "b", "m", "--owner-reserve", bad])
        assert "--owner-reserve" in str(e.value) and "\n" not in str(e.value)
