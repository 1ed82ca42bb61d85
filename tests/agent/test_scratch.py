"""The agent's scratch mount (agent/scratch.py) stopped at the worst moment: while scratchfs is
still starting. A SIGTERM to the agent then cancels the wait for scratchfs's ready word; the
stop that follows found no mount to unmount and used to wait UMOUNT_TIMEOUT (60 s) for a
daemon nobody had asked to stop, then SIGKILL it (the full suite's heartbeat test hit this:
72 s instead of 15)."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import pytest
import trio

from agent import scratch
from scratchfs.keyholder import mountinfo


# 0: cancelled at start()'s first wait, the daemon still importing Python; later: wherever
# its start-up has got to by then (mounted or not, handler installed or not): every window
# must end the same way.
@pytest.mark.parametrize("cancel_after", [0.0, 0.15, 0.3])
async def test_stop_while_scratchfs_is_still_starting_ends_it_without_a_kill(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, cancel_after: float
) -> None:
    caplog.set_level(logging.INFO, logger="agent.scratch")
    mount = scratch.ScratchMount(
        tmp_path / "backing", tmp_path / "scratch", tmp_path / "scratchfs.pid", tmp_path / "scratchfs.log"
    )
    with trio.move_on_after(cancel_after):  # start() spawns the daemon before its first wait
        await mount.start()
    assert mount.proc is not None
    with trio.fail_after(scratch.UMOUNT_TIMEOUT / 2):  # the old stop waited all of it, then killed
        await mount.stop()
    assert mount.proc.returncode in (0, -signal.SIGTERM), (mount.proc.returncode, mount.log_file.read_text()[-2000:])
    assert "event=scratch_kill" not in caplog.text
    assert mountinfo.find(mount.mountpoint) is None
    # Whatever it had mounted is gone with its keys; no blob is left in the backing directory.
    assert sorted(p.name for p in mount.backing.iterdir() if p.name != ".scratchfs") == []
