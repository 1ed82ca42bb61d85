"""Shared fixtures: real scratchfs mounts that are always taken down."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.scratch import SCRATCHFS_OPTIONS
from scratchfs.keyholder import procs
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


@pytest.fixture(scope="session", autouse=True)
def _no_leftover_processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Fail the run if a process the tests started outlives them: a descendant of this
    pytest process, or a daemonized one (reparented away) whose command line names the
    test temp root. Each is named, then killed, so one leak does not poison the next run."""
    root = str(tmp_path_factory.getbasetemp())
    before = set(procs.descendants(os.getpid()))
    yield
    left: dict[int, str] = {}
    deadline = time.monotonic() + 10  # servers stopped by the last test may still be exiting
    while True:
        left = {pid: " ".join(procs.cmdline(pid))[:160]
                for pid in procs.descendants(os.getpid()) if pid not in before}
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != os.getpid():
                cmd = " ".join(procs.cmdline(int(entry)))
                if root in cmd:
                    left[int(entry)] = cmd[:160]
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left behind by the tests: {left}"


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
