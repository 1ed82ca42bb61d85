"""Fixtures for the security suite: one 4 KiB-block mount per module for the tamper tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.mounting import Mounted, mount, unmount
from tests.security.helpers import BS, read_block, write_file

CONTROL = b"control file: must stay readable while blobs are attacked\n" * 200


@pytest.fixture(scope="module")
def tamper_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mounted]:
    """A live mount with 4 KiB blocks shared by one module's attacks (each test uses its own files).

    Attacks produce WARNING lines only; teardown fails if the daemon logged any ERROR (which
    strict mode turns into a non-zero exit) or left anything behind.
    """
    base = tmp_path_factory.mktemp("tamper")
    m = mount(base / "backing", base / "mnt", "--block-size", str(BS))
    write_file(m.mountpoint / "control", CONTROL)
    try:
        yield m
    finally:
        unmount(m)
        assert [p for p in os.listdir(m.backing) if p != ".scratchfs"] == [], "blobs left after unmount"


@pytest.fixture
def attacked(tamper_mount: Mounted) -> Iterator[Mounted]:
    """The shared mount; after the test, the daemon must still serve an untouched file."""
    yield tamper_mount
    got = b"".join(read_block(tamper_mount.mountpoint / "control", i) for i in range(len(CONTROL) // BS + 1))
    assert got == CONTROL, "the daemon stopped serving untouched files after an attack"
