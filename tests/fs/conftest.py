"""Fixtures for the filesystem suite: the same tests run on scratchfs or on a reference tmpfs.

Set ``SCRATCHFS_TEST_TARGET=tmpfs`` to run every test of this package against a freshly mounted
tmpfs instead of scratchfs. That is how the assertions themselves are validated: whatever a test
expects must be what tmpfs does. Tests that only make sense on scratchfs (backing store, CLI)
skip themselves in that mode.

The reference tmpfs is mounted with ``noatime`` because the FUSE kernel module marks every inode
S_NOATIME (the daemon alone decides about atime), so a noatime tmpfs is the closest reference.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from scratchfs import blocks
from scratchfs.profiles import effective_flags
from tests.conftest import MOUNT_MATRIX
from tests.mounting import Mounted, is_mounted, mount, pid_alive, unmount

TARGET_ENV = "SCRATCHFS_TEST_TARGET"
# Block size scratchfs uses when no --block-size is given; only used to place test offsets
# around block boundaries.
DEFAULT_BLOCK_SIZE = blocks.DEFAULT_BLOCK_SIZE


def target_kind() -> str:
    """'scratchfs' (default) or 'tmpfs' (reference run), from SCRATCHFS_TEST_TARGET."""
    kind = os.environ.get(TARGET_ENV, "scratchfs")
    if kind not in ("scratchfs", "tmpfs"):
        raise pytest.UsageError(f"{TARGET_ENV} must be 'scratchfs' or 'tmpfs', not {kind!r}")
    return kind


@dataclass
class Target:
    """A filesystem under test: its root directory and what it is."""

    root: Path
    kind: str
    config: str
    block_size: int
    mounted: Mounted | None

    @property
    def is_scratchfs(self) -> bool:
        return self.kind == "scratchfs"

    @property
    def writeback(self) -> bool:
        """Mounted with the kernel's writeback cache (st_blocks lags until a flush)."""
        return self.mounted is not None and "--writeback-cache" in effective_flags(self.mounted.options)


def _block_size_of(options: list[str]) -> int:
    if "--block-size" in options:
        return int(options[options.index("--block-size") + 1])
    return DEFAULT_BLOCK_SIZE


class _Mounts:
    """Mounts shared by the tests of one module, created on first use, one per configuration.

    Mounting and unmounting costs about two seconds, so each module mounts once per
    configuration and every test works in a fresh subdirectory of it. Teardown unmounts and
    fails on leftovers or logged daemon errors (tests.mounting.unmount).
    """

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        self.factory = factory
        self.scratch: dict[str, Mounted] = {}
        self.tmpfs: dict[str, Path] = {}

    def scratchfs(self, config: str, options: list[str]) -> Mounted:
        if config not in self.scratch:
            base = self.factory.mktemp(f"fs-{config}")
            self.scratch[config] = mount(base / "backing", base / "mnt", *options)
        return self.scratch[config]

    def reference(self, config: str) -> Path:
        if config not in self.tmpfs:
            mnt = self.factory.mktemp(f"tmpfs-{config}")
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "noatime,mode=0755,size=8g", "tmpfs", str(mnt)],
                check=True,
            )
            self.tmpfs[config] = mnt
        return self.tmpfs[config]

    def close(self) -> None:
        errors = []
        for m in self.scratch.values():
            try:
                unmount(m)
            except AssertionError as e:
                errors.append(str(e))
        for mnt in self.tmpfs.values():
            if subprocess.run(["umount", str(mnt)], check=False).returncode != 0:
                subprocess.run(["umount", "-l", str(mnt)], check=False)
            if is_mounted(mnt):
                errors.append(f"reference tmpfs {mnt} still mounted")
        assert not errors, errors


@pytest.fixture(scope="module")
def _module_mounts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Mounts]:
    mounts = _Mounts(tmp_path_factory)
    try:
        yield mounts
    finally:
        mounts.close()


def _make_target(
    request: pytest.FixtureRequest, mounts: _Mounts, config: str, options: list[str]
) -> Iterator[Target]:
    """A fresh, empty directory on the (shared) filesystem under test."""
    name = request.node.name.replace("/", "_")[:120]
    if target_kind() == "tmpfs":
        base = mounts.reference(config)
        mounted = None
        block_size = 4096
    else:
        mounted = mounts.scratchfs(config, options)
        base = mounted.mountpoint
        block_size = _block_size_of(options)
    root = base / name
    os.mkdir(root, 0o755)
    yield Target(root, target_kind(), config, block_size, mounted)
    if mounted is not None:
        # Pin a daemon crash on the test that caused it, not on the module's teardown.
        assert pid_alive(mounted.pid), f"scratchfs daemon died during {name}"
        assert is_mounted(mounted.mountpoint), f"mount vanished during {name}"


_MATRIX_IDS = ["tmpfs"] if target_kind() == "tmpfs" else list(MOUNT_MATRIX)


@pytest.fixture(params=_MATRIX_IDS, ids=_MATRIX_IDS)
def fs(request: pytest.FixtureRequest, _module_mounts: _Mounts) -> Iterator[Target]:
    """The filesystem under test, once per scratchfs configuration (or tmpfs)."""
    config = str(request.param)
    yield from _make_target(request, _module_mounts, config, MOUNT_MATRIX.get(config, []))


@pytest.fixture
def fs1(request: pytest.FixtureRequest, _module_mounts: _Mounts) -> Iterator[Target]:
    """The filesystem under test in its default configuration only (expensive tests)."""
    yield from _make_target(request, _module_mounts, "default", [])


@pytest.fixture
def fs_shared(request: pytest.FixtureRequest, _module_mounts: _Mounts) -> Iterator[Target]:
    """Default configuration mounted with --allow-other, for tests run as another user."""
    yield from _make_target(request, _module_mounts, "allow-other", ["--allow-other"])


@pytest.fixture
def scratchfs_only() -> None:
    """Skip in the tmpfs reference run: the test is about scratchfs itself."""
    if target_kind() != "scratchfs":
        pytest.skip("scratchfs-specific test (reference run against tmpfs)")


@pytest.fixture
def umask0() -> Iterator[None]:
    """Run the test with umask 0 so requested modes reach the filesystem unchanged."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def needs_xattrs(fs: Target) -> None:
    """Skip in configurations mounted with --no-xattr, where xattrs are off by design
    (tests/fs/test_stats.py checks what such a mount answers instead)."""
    if fs.mounted is not None and "--no-xattr" in effective_flags(fs.mounted.options):
        pytest.skip("mounted with --no-xattr")
