"""The daemon's own resources: no descriptor leaks across open/close/unlink cycles."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.fs.conftest import Target

pytestmark = pytest.mark.usefixtures("scratchfs_only")


def daemon_fds(pid: int) -> set[str]:
    """Targets of the daemon's open descriptors (blob paths, /dev/fuse, pipes...)."""
    out = set()
    base = Path(f"/proc/{pid}/fd")
    for fd in os.listdir(base):
        try:
            out.add(f"{fd}->{os.readlink(base / fd)}")
        except FileNotFoundError:
            continue
    return out


def test_no_fd_leak(fs: Target) -> None:
    assert fs.mounted is not None
    pid = fs.mounted.pid
    before = daemon_fds(pid)
    for i in range(200):
        p = fs.root / f"f{i % 10}"
        with open(p, "ab") as f:
            f.write(b"x" * 5000)
        fd = os.open(p, os.O_RDONLY)
        os.read(fd, 100)
        if i % 3 == 0:
            os.unlink(p)
        os.close(fd)
        src = fs.root / f"f{(i + 1) % 10}"
        if i % 7 == 0 and src.exists() and not (fs.root / "l").exists():
            os.link(src, fs.root / "l")
    for p in fs.root.iterdir():
        p.unlink()
    # Releases reach the daemon asynchronously after close(); wait boundedly.
    deadline = time.monotonic() + 10
    while len(daemon_fds(pid)) > len(before) and time.monotonic() < deadline:
        time.sleep(0.05)
    after = daemon_fds(pid)
    assert len(after) <= len(before), f"daemon descriptors left open: {sorted(after - before)[:10]}"
