"""Crash safety: SIGKILL at random points, and clean shutdown on SIGTERM / SIGINT / SIGHUP."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.mounting import Mounted, is_mounted, mount, pid_alive, run_cli, unmount, wait_pid_gone
from tests.security.helpers import write_file

ITERATIONS = 8
MARK = b"CRASH-MARKER-"

# A mixed workload run in its own process (so a dead mount can only fail it, never the test):
# creates, appends, overwrites, sparse writes, truncates, renames over existing files, hard links,
# unlinks, fsyncs and xattrs, every content chunk carrying a marker. It stops at the first error
# (the daemon is dead: ENOTCONN / ECONNABORTED) or after a bounded number of rounds.
WORKLOAD = r"""
import os, sys
root, tag, seed = sys.argv[1], sys.argv[2].encode(), int(sys.argv[3])
import random
rng = random.Random(seed)
chunk = (tag * 200)[:4096]
try:
    os.makedirs(os.path.join(root, "d"), exist_ok=True)
    for n in range(400):
        name = os.path.join(root, "d", "f%d" % rng.randrange(12))
        op = rng.randrange(9)
        if op <= 2:
            with open(name, "ab") as f:
                f.write(chunk * rng.randrange(1, 20))
                if op == 2:
                    os.fsync(f.fileno())
        elif op == 3:
            fd = os.open(name, os.O_RDWR | os.O_CREAT, 0o600)
            os.pwrite(fd, chunk, rng.randrange(0, 300_000))
            os.close(fd)
        elif op == 4 and os.path.exists(name):
            os.truncate(name, rng.randrange(0, 50_000))
        elif op == 5 and os.path.exists(name):
            os.replace(name, os.path.join(root, "d", "f%d" % rng.randrange(12)))
        elif op == 6 and os.path.exists(name):
            target = os.path.join(root, "d", "l%d" % n)
            os.link(name, target)
        elif op == 7 and os.path.exists(name):
            os.unlink(name)
        elif op == 8 and os.path.exists(name):
            os.setxattr(name, "user.tag", tag)
            with open(name, "rb") as f:
                f.read()
    sys.exit(0)
except OSError as e:
    sys.exit(3 if e.errno in (107, 103, 5, 2) else 4)
"""


def _blobs_with(backing: Path, needle: bytes) -> list[str]:
    """Names of blobs in *backing* that contain *needle* (the marker file is ours, not a blob)."""
    hits = []
    for p in backing.iterdir():
        if p.name == ".scratchfs":
            continue
        try:
            if needle in p.read_bytes():
                hits.append(p.name)
        except FileNotFoundError:
            continue
    return hits


def test_sigkill_at_random_points_never_leaks_and_always_recovers(tmp_path: Path) -> None:
    """Kill the daemon with SIGKILL mid-workload, many times, on one backing directory.

    Why the blobs a killed daemon leaves behind are undecryptable, by design: every file key is
    drawn from the OS CSPRNG (secrets.token_bytes) when the file gets its first byte and is held
    only in that daemon's memory; no code path writes a key to the backing store, a log, argv, the
    environment or any other file, and the format has no key-wrapping or header that could carry
    one. The daemon is non-dumpable with RLIMIT_CORE 0 (no core file can copy its memory to disk)
    and mlockall()s its memory (no page of it reaches swap). So when SIGKILL ends the process, the
    only copies of the keys vanish with its address space: what remains is AES-256-GCM ciphertext
    under keys that no longer exist anywhere. The test checks what can be observed from outside:
    no plaintext marker in any blob (during the workload and after the kill), `scratchfs umount`
    clears the stale (ENOTCONN) mount every time, the next mount succeeds and has wiped every
    leftover blob before it serves.
    """
    rng = random.Random(0x5C4A7C4)
    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    leftovers_seen = 0
    for i in range(ITERATIONS):
        before = [p for p in backing.iterdir() if p.name != ".scratchfs"] if backing.exists() else []
        m = mount(backing, mnt, "--block-size", "4096", log_path=tmp_path / f"daemon-{i}.log")
        try:
            assert m.blobs() == [], f"iteration {i}: mount served before wiping {len(m.blobs())} leftover blob(s)"
            assert not any(p.exists() for p in before), "a leftover blob survived the next mount"
            tag = MARK + str(i).encode() + b"-"
            worker = subprocess.Popen(
                [sys.executable, "-c", WORKLOAD, str(mnt), tag.decode(), str(i)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                kill_at = time.monotonic() + rng.uniform(0.05, 0.8)
                while time.monotonic() < kill_at:  # scan the live store until the kill
                    assert _blobs_with(backing, MARK) == [], "plaintext marker found in a live blob"
                os.kill(m.pid, signal.SIGKILL)
                assert wait_pid_gone(m.pid), "SIGKILLed daemon did not die"
                worker.wait(timeout=60)
            finally:
                if worker.poll() is None:
                    worker.kill()
                    worker.wait()
            left = [p for p in backing.iterdir() if p.name != ".scratchfs"]
            leftovers_seen += len(left)
            assert _blobs_with(backing, MARK) == [], "plaintext marker found in a blob left by the killed daemon"
            if is_mounted(mnt):
                with pytest.raises(OSError) as stale:
                    os.listdir(mnt)
                # the first access after the abort may say ECONNABORTED, later ones ENOTCONN
                assert stale.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
            r = run_cli("umount", str(mnt))
            assert r.returncode == 0, f"iteration {i}: umount of the stale mount failed: {r.stderr.strip()}"
            assert not is_mounted(mnt)
            assert os.listdir(mnt) == [], "mountpoint not usable after clearing the stale mount"
        finally:
            if pid_alive(m.pid) or is_mounted(mnt):
                unmount(m, check_log=False)
    assert leftovers_seen > 0, "no kill ever hit a moment with blobs on disk: the test proved nothing about wiping"
    final = mount(backing, mnt, log_path=tmp_path / "daemon-final.log")
    try:
        assert final.blobs() == []
        write_file(mnt / "after", b"works after 8 crashes")
        assert (mnt / "after").read_bytes() == b"works after 8 crashes"
    finally:
        unmount(final)
    assert [p.name for p in backing.iterdir()] == [".scratchfs"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_termination_signal_unmounts_cleanly_and_shreds(tmp_path: Path, signum: signal.Signals) -> None:
    m: Mounted = mount(tmp_path / "backing", tmp_path / "mnt")
    try:
        for k in range(4):
            write_file(m.mountpoint / f"f{k}", os.urandom(200_000))
        held = open(m.mountpoint / "held-open", "wb")  # kept open across the signal on purpose
        held.write(b"x" * 70_000)
        held.flush()
        assert len(m.blobs()) == 5
        os.kill(m.pid, signum)
        assert wait_pid_gone(m.pid), f"daemon ignored {signum.name}"
        try:
            held.close()
        except OSError as e:
            assert e.errno in (errno.ENOTCONN, errno.ECONNABORTED)
        assert not is_mounted(m.mountpoint), f"{signum.name}: mount still present after the daemon exited"
        assert m.blobs() == [], f"{signum.name}: blobs left behind"
        log = m.log_text()
        assert f"event=signal signal={signum.name} action=unmount" in log
        assert "event=unmounted" in log and "files_shredded=5" in log
    finally:
        unmount(m)
