"""Shared fixtures: real scratchfs mounts that are always taken down."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.scratch import SCRATCHFS_OPTIONS
from tests.mounting import Mounted, fuse_mounts_under, mount, unmount

# Filesystem tests run over each configuration that changes behaviour.
MOUNT_MATRIX = {
    "default": [],  # 16 KiB blocks
    "bs64k": ["--block-size", "65536"],
    "writeback": ["--writeback-cache"],
    # The agent's scratch mount (agent/scratch.py): --no-xattr, write-back and keep cache.
    "agent": list(SCRATCHFS_OPTIONS),
}


@pytest.fixture(scope="session", autouse=True)
def _no_leftover_mounts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Fail the run if any FUSE mount below the test temp root is left behind."""
    root = str(tmp_path_factory.getbasetemp())
    yield
    left = fuse_mounts_under(root)
    for mnt in left:
        subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True, check=False)
    assert not left, f"FUSE mounts left behind by the tests: {left}"


@pytest.fixture
def mount_factory(tmp_path: Path) -> Iterator[Callable[..., Mounted]]:
    """Mount scratchfs with chosen options; every mount is unmounted at teardown."""
    made: list[Mounted] = []

    def factory(*options: str, name: str = "m") -> Mounted:
        m = mount(tmp_path / f"{name}-backing", tmp_path / f"{name}-mnt", *options)
        made.append(m)
        return m

    yield factory
    errors = []
    for m in reversed(made):
        try:
            unmount(m)
        except AssertionError as e:
            errors.append(str(e))
    assert not errors, errors


@pytest.fixture(params=list(MOUNT_MATRIX), ids=list(MOUNT_MATRIX))
def scratch(request: pytest.FixtureRequest, mount_factory: Callable[..., Mounted]) -> Mounted:
    """A live scratchfs mount, once per configuration in MOUNT_MATRIX."""
    return mount_factory(*MOUNT_MATRIX[request.param])


@pytest.fixture
def scratch1(mount_factory: Callable[..., Mounted]) -> Mounted:
    """A live scratchfs mount with default options (for tests that need one configuration)."""
    return mount_factory()
