"""Deferred blob removal keeps the crash guarantee: the key dies at unlink, so whatever blob a
killed daemon had still queued is undecryptable, and the next mount wipes it before serving."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.mounting import mount, unmount, wait_pid_gone

MARKER = b"DEFERRED-REMOVAL-CANARY-7f3a9c"


def test_sigkill_with_removals_queued(tmp_path: Path) -> None:
    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    m = mount(backing, mnt)
    try:
        for i in range(40):
            (mnt / f"f{i}").write_bytes(MARKER * 300)
        for i in range(40):
            (mnt / f"f{i}").unlink()
        # Inside the reaper's coalescing pause: most of these blobs are still queued.
        os.kill(m.pid, signal.SIGKILL)
        assert wait_pid_gone(m.pid)
        leftovers = m.blobs()
        print(f"{len(leftovers)} blob(s) were still queued at the kill")
        for blob in leftovers:
            assert MARKER not in blob.read_bytes(), f"plaintext in leftover blob {blob.name}"
    finally:
        unmount(m, check_log=False)  # clears the stale mount the kill left
    again = mount(backing, mnt)
    try:
        assert again.blobs() == [], "the next mount served before wiping the queued leftovers"
        assert "event=wipe_leftovers" in again.log_text() or not leftovers
    finally:
        unmount(again)


def test_unmount_removes_what_is_still_queued(tmp_path: Path) -> None:
    m = mount(tmp_path / "backing", tmp_path / "mnt")
    try:
        for i in range(40):
            (m.mountpoint / f"f{i}").write_bytes(b"x" * 20_000)
        for i in range(40):
            (m.mountpoint / f"f{i}").unlink()
    finally:
        unmount(m)  # right away, inside the coalescing pause
    assert [p.name for p in (tmp_path / "backing").iterdir()] == [".scratchfs"]
