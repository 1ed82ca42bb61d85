"""fallocate(2) on the mount, every served mode checked against a tmpfs doing the same (issue 23).

Each scenario runs the same sequence of writes, truncates and fallocates on a file of the mount
under test and on a file of a reference tmpfs; after every step the outcome (ok or the errno),
the size and the whole content must be the same. Offsets are placed around the mount's block
boundaries (unaligned ranges, ranges across blocks, whole blocks, the short last block), so
they exercise the block map's holes and the read-modify-write of partial blocks.

Not tested: that data and size survive unmount/remount. Scratch space does not: every key and
blob is shredded at unmount (tests/fs/test_daemon.py), fallocated ranges included.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from scratchfs.fallocate import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, fallocate
from tests.fs.conftest import Target, _make_target, _Mounts, target_kind
from tests.fs.helpers import errno_name, read_all
from tests.mounting import Mounted, is_mounted, mount, unmount

KEEP = FALLOC_FL_KEEP_SIZE
PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
ZERO = FALLOC_FL_ZERO_RANGE
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_INSERT_RANGE = 0x20
MiB = 1 << 20

# Step = (operation, arguments): "write" (offset, length, seed), "truncate" (size),
# "fallocate" (mode, offset, length).
Step = tuple[str, tuple[int, ...]]


def _scenarios(bs: int) -> dict[str, list[Step]]:
    return {
        "mode0-extends-with-zeros": [
            ("write", (0, 3, 1)),
            ("fallocate", (0, bs - 10, 2 * bs + 20)),
            ("fallocate", (0, 0, bs)),  # inside the file: nothing changes
            ("write", (bs + 5, 100, 2)),
        ],
        "mode0-grows-short-last-block": [
            ("write", (0, bs + 100, 3)),
            ("fallocate", (0, bs + 50, bs)),
            ("write", (2 * bs + 10, 10, 4)),
        ],
        "keep-size-past-eof-then-write": [
            ("write", (0, 1000, 5)),
            ("fallocate", (KEEP, 500, 4 * bs)),
            ("write", (3 * bs + 7, 200, 6)),
            ("fallocate", (KEEP, 10 * bs, bs)),
        ],
        "punch-unaligned-across-blocks": [
            ("write", (0, 4 * bs, 7)),
            ("fallocate", (PUNCH, bs // 2, 2 * bs + 100)),
            ("write", (bs, 10, 8)),  # into the new hole
        ],
        "punch-whole-block-reads-zeros": [
            ("write", (0, 3 * bs, 9)),
            ("fallocate", (PUNCH, bs, bs)),
            ("fallocate", (PUNCH, 0, 1)),
        ],
        "punch-inside-a-hole": [
            ("truncate", (4 * bs,)),
            ("write", (3 * bs, 5, 10)),
            ("fallocate", (PUNCH, bs, bs)),
            ("fallocate", (PUNCH, bs + 3, 7)),
        ],
        "punch-past-eof": [
            ("write", (0, 2 * bs + 7, 11)),
            ("fallocate", (PUNCH, 2 * bs, 10 * bs)),  # the short last block, and beyond
            ("fallocate", (PUNCH, 5 * bs, bs)),  # wholly past the end: nothing
            ("fallocate", (PUNCH, bs - 1, 2)),
            ("write", (3 * bs, 4, 12)),  # grows over the punched short block
        ],
        "punch-everything": [
            ("write", (0, 3 * bs + 1, 13)),
            ("fallocate", (PUNCH, 0, 4 * bs)),
            ("truncate", (bs + 1,)),
            ("write", (bs, 1, 14)),
        ],
        "zero-range": [
            ("write", (0, 3 * bs, 15)),
            ("fallocate", (ZERO, 100, bs)),  # inside
            ("fallocate", (ZERO, 2 * bs + 1, 2 * bs)),  # grows the file
            ("fallocate", (ZERO | KEEP, 4 * bs, 3 * bs)),  # keeps the size
            ("write", (5 * bs, 3, 16)),
        ],
        "unsupported-and-invalid": [
            ("write", (0, bs, 17)),
            ("fallocate", (FALLOC_FL_PUNCH_HOLE, 0, 10)),  # PUNCH_HOLE needs KEEP_SIZE
            ("fallocate", (FALLOC_FL_COLLAPSE_RANGE, 0, bs)),
            ("fallocate", (FALLOC_FL_INSERT_RANGE, 0, bs)),
            ("fallocate", (PUNCH | ZERO, 0, 10)),
            ("fallocate", (0, -1, 10)),
            ("fallocate", (0, 0, 0)),
            ("fallocate", (KEEP, 0, -5)),
            ("fallocate", (0, (1 << 63) - 10, 20)),  # overflows: EFBIG
        ],
    }


def _run(path: Path, steps: list[Step]) -> list[tuple[str, int, bytes]]:
    """Apply *steps* to a new file at *path*; (outcome, size, content) after each step."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o644)
    states = []
    try:
        for op, args in steps:
            if op == "write":
                offset, length, seed = args
                data = bytes((seed * 31 + i) % 251 for i in range(length))
                outcome = errno_name(os.pwrite, fd, data, offset)
            elif op == "truncate":
                outcome = errno_name(os.ftruncate, fd, args[0])
            else:
                outcome = errno_name(fallocate, fd, *args)
            size = os.fstat(fd).st_size
            states.append((f"{op}{args}: {outcome}", size, read_all(fd, size + 1, 0)))
    finally:
        os.close(fd)
    return states


@pytest.fixture
def reference(_module_mounts: _Mounts) -> Path:
    """A directory on the module's reference tmpfs."""
    return _module_mounts.reference("reference")


# Beyond the suite's matrix: the other cache modes, and the profiles by name.
EXTRA_CONFIGS = {
    "direct-io": ["--direct-io"],
    "keep-cache": ["--keep-cache"],
    "profile-posix": ["--profile", "posix"],
    "profile-scratch": ["--profile", "scratch"],
}


@pytest.fixture(params=list(EXTRA_CONFIGS), ids=list(EXTRA_CONFIGS))
def fs_extra(request: pytest.FixtureRequest, _module_mounts: _Mounts) -> Iterator[Target]:
    config = str(request.param)
    yield from _make_target(request, _module_mounts, config, EXTRA_CONFIGS[config])


@pytest.mark.parametrize("scenario", list(_scenarios(4096)))
def test_fallocate_matches_tmpfs(fs: Target, reference: Path, tmp_path: Path, scenario: str) -> None:
    steps = _scenarios(fs.block_size)[scenario]
    if scenario == "zero-range":
        # tmpfs has no ZERO_RANGE (EOPNOTSUPP): the reference is then a plain directory on ext4.
        if not fs.is_scratchfs:
            pytest.skip("tmpfs has no FALLOC_FL_ZERO_RANGE")
        reference = tmp_path
    got = _run(fs.root / "f", steps)
    expected = _run(reference / f"{fs.config}-{scenario}", steps)
    for (what, size, data), (ref_what, ref_size, ref_data) in zip(got, expected, strict=True):
        assert what == ref_what
        assert size == ref_size, what
        assert data == ref_data, what


@pytest.mark.parametrize("scenario", ["punch-unaligned-across-blocks", "zero-range", "keep-size-past-eof-then-write"])
def test_fallocate_matches_tmpfs_other_configs(
    fs_extra: Target, reference: Path, tmp_path: Path, scenario: str
) -> None:
    test_fallocate_matches_tmpfs(fs_extra, reference, tmp_path, scenario)


def test_bad_handles(fs: Target) -> None:
    p = fs.root / "f"
    p.write_bytes(b"x" * 100)
    fd = os.open(p, os.O_RDONLY)
    try:
        assert errno_name(fallocate, fd, 0, 0, 1000) == "EBADF"
        assert errno_name(fallocate, fd, PUNCH, 0, 10) == "EBADF"
    finally:
        os.close(fd)
    dfd = os.open(fs.root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert errno_name(fallocate, dfd, 0, 0, 10) == "EBADF"
    finally:
        os.close(dfd)
    assert p.read_bytes() == b"x" * 100


def test_punched_blocks_are_freed(fs: Target) -> None:
    bs = fs.block_size
    p = fs.root / "f"
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.pwrite(fd, os.urandom(8 * bs), 0)
        os.fsync(fd)
        before = os.fstat(fd).st_blocks
        fallocate(fd, PUNCH, bs, 6 * bs)
        after = os.fstat(fd).st_blocks
        if not fs.writeback:  # there st_blocks lags (the kernel's cached attributes)
            assert after <= before - 6 * bs // 512, (before, after)
        assert os.fstat(fd).st_size == 8 * bs
        assert read_all(fd, 6 * bs, bs) == bytes(6 * bs)
    finally:
        os.close(fd)


def test_times_move_like_a_write(fs: Target) -> None:
    bs = fs.block_size
    p = fs.root / "f"
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.pwrite(fd, b"y" * (2 * bs), 0)
        modes = [(0, 0, 4 * bs), (PUNCH, 0, bs)] + ([(ZERO, bs, 3 * bs)] if fs.is_scratchfs else [])
        for mode, offset, length in modes:
            st = os.fstat(fd)
            time.sleep(0.02)
            fallocate(fd, mode, offset, length)
            now = os.fstat(fd)
            assert now.st_mtime_ns > st.st_mtime_ns, mode
            assert now.st_ctime_ns > st.st_ctime_ns, mode
    finally:
        os.close(fd)


# --- scratchfs only: its own limits --------------------------------------------------------------
@pytest.fixture
def scratchfs_mount(tmp_path: Path) -> Callable[..., Mounted]:
    if target_kind() != "scratchfs":
        pytest.skip("scratchfs options")
    made: list[Mounted] = []

    def factory(*options: str, backing: Path | None = None) -> Mounted:
        m = mount(backing or tmp_path / "backing", tmp_path / "mnt", *options)
        made.append(m)
        return m

    yield factory  # type: ignore[misc]
    for m in made:
        unmount(m)


def test_efbig_past_max_file_size_changes_nothing(scratchfs_mount: Callable[..., Mounted]) -> None:
    m = scratchfs_mount("--max-file-size", "1M")
    fd = os.open(m.mountpoint / "f", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.pwrite(fd, b"z" * 1000, 0)
        for mode in (0, KEEP, PUNCH, ZERO, ZERO | KEEP):
            assert errno_name(fallocate, fd, mode, MiB - 10, 11) == "EFBIG", mode
            assert os.fstat(fd).st_size == 1000
        assert os.pread(fd, 2000, 0) == b"z" * 1000
        fallocate(fd, 0, 0, MiB)  # up to the limit exactly
        assert os.fstat(fd).st_size == MiB
        os.pwrite(fd, b"end", MiB - 3)
        assert os.pread(fd, 3, MiB - 3) == b"end"
    finally:
        os.close(fd)


def test_enospc_when_the_backing_store_cannot_hold_the_range(
    scratchfs_mount: Callable[..., Mounted], tmp_path: Path
) -> None:
    backing = tmp_path / "small"
    backing.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(backing)], check=True)
    try:
        m = scratchfs_mount("--stats-file", str(tmp_path / "stats.json"), backing=backing / "store")
        fd = os.open(m.mountpoint / "f", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            os.pwrite(fd, b"a" * 100, 0)
            for mode in (0, KEEP, ZERO, ZERO | KEEP):
                assert errno_name(fallocate, fd, mode, 0, 64 * MiB) == "ENOSPC", mode
                assert os.fstat(fd).st_size == 100
            assert os.pread(fd, 200, 0) == b"a" * 100
            # A punch needs no space; what fits is allocated, and the writes into it succeed.
            fallocate(fd, PUNCH, 0, 64 * MiB)
            fallocate(fd, 0, 0, 8 * MiB)
            data = os.urandom(8 * MiB)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
            assert read_all(fd, 8 * MiB, 0) == data
        finally:
            os.close(fd)
        unmount(m)
        counts = json.loads((tmp_path / "stats.json").read_text())["requests"]
        assert counts["fallocate"] == 6  # four refused, the punch, the allocation
    finally:
        subprocess.run(["umount", str(backing)], check=False)


def test_stock_pyfuse3_is_detected_once_and_the_mount_serves(tmp_path: Path) -> None:
    """With a pyfuse3 that has no fallocate (stock 3.5.0), scratchfs mounts, says so once, serves."""
    if target_kind() != "scratchfs":
        pytest.skip("scratchfs start-up")
    log = tmp_path / "log"
    stock = (
        "import sys, pyfuse3\n"
        "del pyfuse3.Operations.fallocate\n"  # what stock pyfuse3 3.5.0 looks like
        "from scratchfs.cli import main\n"
        "sys.exit(main())\n"
    )
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (tmp_path / "backing").mkdir()
    # In the foreground: a daemonized mount would start a fresh interpreter.
    with log.open("w") as log_out:  # a foreground daemon logs to stderr
        proc = subprocess.Popen(
            [sys.executable, "-c", stock, "mount", str(tmp_path / "backing"), str(mnt), "--foreground", "--strict"],
            stdout=subprocess.DEVNULL, stderr=log_out,
        )  # fmt: skip
    m = Mounted(tmp_path / "backing", mnt, proc.pid, log, [])
    try:
        deadline = time.monotonic() + 30
        while not is_mounted(mnt) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert is_mounted(mnt), "the mount did not come up"
        (mnt / "f").write_bytes(b"still served")
        assert (mnt / "f").read_bytes() == b"still served"
    finally:
        unmount(m)
        proc.wait(timeout=60)
    assert log.read_text().count("event=fallocate_unavailable") == 1
