"""The daemon's request loop (third_party/pyfuse3/direct-read.patch, scratchfs/request_loop.py):
requests are read straight from a non-blocking /dev/fuse, with or without a spin, and a stream
of requests that never lets the queue run dry still leaves the daemon's other tasks their turn."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from scratchfs import request_loop
from tests.mounting import Mounted

O_NONBLOCK = 0o4000
HAMMER_JOBS = 4


def fuse_fd_flags(pid: int) -> int:
    """The open-file flags of the daemon's /dev/fuse descriptor (from /proc/PID/fdinfo)."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/fuse":
                for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
                    if line.startswith("flags:"):
                        return int(line.split()[1], 8)
        except FileNotFoundError:
            continue
    raise AssertionError(f"daemon {pid} has no /dev/fuse open")


def test_default_mount_reads_requests_directly(scratch1: Mounted) -> None:
    (scratch1.mountpoint / "f").write_bytes(b"x" * 10_000)
    assert (scratch1.mountpoint / "f").read_bytes() == b"x" * 10_000
    assert fuse_fd_flags(scratch1.pid) & O_NONBLOCK
    assert re.search(rf"\bspin_ns={request_loop.spin_ns(None)}\b", scratch1.log_text())


def start_fio(directory: Path) -> subprocess.Popen[bytes]:
    """fio: HAMMER_JOBS jobs of 4 KiB O_DIRECT random writes and verified reads, QD1, until
    killed; jobs as threads of one process (``--thread``), so that killing it stops them all."""
    return subprocess.Popen(
        ["fio", "--name=hammer", f"--directory={directory}", f"--numjobs={HAMMER_JOBS}", "--rw=randrw",
         "--bs=4k", "--size=1M", "--direct=1", "--ioengine=psync", "--time_based", "--runtime=120",
         "--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0", "--thread", "--output-format=terse"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


@pytest.mark.parametrize("spin_us", ["0", str(request_loop.MAX_SPIN_US)])
def test_signals_are_served_while_requests_never_stop(
    mount_factory: Callable[..., Mounted], tmp_path: Path, spin_us: str
) -> None:
    # Four fio jobs keep requests coming: a loop that read the next request directly for as
    # long as one came within the spin would hardly ever reach trio's scheduler, and the
    # SIGUSR1 stats dump (a trio task, like unmount on SIGTERM) would wait. The loop waits
    # through trio after at most 32 direct reads. (Measured: a loop with a spin that never
    # ends fails here; one without the cap mostly passes, because on this 2-CPU machine the
    # stream has gaps longer than the spin often enough.)
    stats = tmp_path / "stats.json"
    m = mount_factory("--spin-us", spin_us, "--stats-file", str(stats))
    assert re.search(rf"\bspin_ns={int(spin_us) * 1000}\b", m.log_text())
    fio = start_fio(m.mountpoint)
    try:
        time.sleep(0.5)  # the stream is flowing
        dumps = []
        for _ in range(3):
            os.kill(m.pid, signal.SIGUSR1)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                if stats.exists():
                    doc = json.loads(stats.read_text())
                    if doc["dumps"] > len(dumps):
                        dumps.append(doc["total"])
                        break
                time.sleep(0.05)
            else:
                raise AssertionError(f"no stats dump within 15 s under load (had {len(dumps)})")
        assert fio.poll() is None, "fio stopped early"
        assert dumps == sorted(dumps) and dumps[-1] > dumps[0], dumps  # served while dumping
    finally:
        fio.kill()
        _, err = fio.communicate(timeout=60)
    assert fio.returncode == -signal.SIGKILL, err.decode(errors="replace")[-2000:]
