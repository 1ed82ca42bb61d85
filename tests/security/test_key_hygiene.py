"""Key hygiene: a hardened daemon, no key or plaintext in logs, reprs or messages, nothing left on disk."""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from scratchfs import blocks
from scratchfs.content import FileContent
from scratchfs.crypto import KEY_BYTES, FileKey
from scratchfs.errors import IntegrityError
from scratchfs.store import BlobStore
from tests.mounting import Mounted, is_mounted, unmount
from tests.security.helpers import write_file

PROBE_GID = 4321


def _limits_core(pid: int) -> tuple[str, str]:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max core file size"):
                soft, hard = line.split()[4:6]
                return soft, hard
    raise AssertionError("no core limit line")


def _vmlck_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmLck:"):
                return int(line.split()[1])
    raise AssertionError("no VmLck line")


def test_daemon_locks_memory_and_disables_core_dumps(scratch1: Mounted) -> None:
    assert _limits_core(scratch1.pid) == ("0", "0")
    assert _vmlck_kb(scratch1.pid) > 0, "mlockall did not lock the daemon's memory"
    assert "event=harden_failed" not in scratch1.log_text()


def test_daemon_is_not_dumpable_and_warns_once_without_mlock(tmp_path: Path) -> None:
    """Run the daemon as root with gid 4321, without CAP_IPC_LOCK and with RLIMIT_MEMLOCK 0.

    The kernel gives /proc/PID/* of a *dumpable* process the task's uid:gid, and of a
    non-dumpable one root:root (task_dump_owner), so the group of /proc/PID/environ tells whether
    PR_SET_DUMPABLE 0 took effect. A plain process started the same way is the control that
    shows the probe can fail. Without CAP_IPC_LOCK and a zero RLIMIT_MEMLOCK mlockall must fail:
    the daemon still mounts and logs exactly one WARNING about it.
    """
    backing, mnt, log = tmp_path / "b", tmp_path / "m", tmp_path / "m.log"
    backing.mkdir()
    mnt.mkdir()
    pid_file = tmp_path / "m.pid"
    drop = ["setpriv", f"--regid={PROBE_GID}", "--clear-groups", "--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock"]
    cmd = [*drop, "prlimit", "--memlock=0:0", sys.executable, "-m", "scratchfs", "mount", str(backing), str(mnt)]
    # --allow-other: FUSE admits only the mounting uid *and gid* otherwise, and this test runs with gid 0
    cmd += ["--allow-other", "--strict", "--pid-file", str(pid_file), "--log-file", str(log)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    m = Mounted(backing, mnt, int(pid_file.read_text()), log)
    try:
        status = Path(f"/proc/{m.pid}/status").read_text()
        assert re.search(rf"^Gid:\s+{PROBE_GID}\s", status, re.M), "probe setup: daemon should run with the probe gid"
        assert os.stat(f"/proc/{m.pid}/environ").st_gid == 0, "daemon is dumpable (PR_SET_DUMPABLE 0 not in effect)"
        assert _limits_core(m.pid) == ("0", "0")
        assert _vmlck_kb(m.pid) == 0
        write_file(mnt / "f", b"still works without mlock")
        assert (mnt / "f").read_bytes() == b"still works without mlock"
        warnings = [ln for ln in m.log_text().splitlines() if "event=harden_failed" in ln]
        assert len(warnings) == 1 and " WARNING " in warnings[0] and "step=mlockall" in warnings[0], warnings
        control = subprocess.Popen([*drop, "sleep", "30"])
        try:
            # setpriv execs sleep in place; probe once the exec happened (bounded wait on comm)
            for _ in range(1000):
                if Path(f"/proc/{control.pid}/comm").read_text().strip() == "sleep":
                    break
                time.sleep(0.01)
            control_gid = Path(f"/proc/{control.pid}/environ").stat().st_gid
            assert control_gid == PROBE_GID, "control: a dumpable process must show its own gid"
        finally:
            control.kill()
            control.wait()
    finally:
        unmount(m)
    assert not is_mounted(mnt)
    assert [p.name for p in backing.iterdir()] == [".scratchfs"]


MARKERS = [b"CANARY-CONTENT-7f3a9c", b"CANARY-XATTR-51be02", b"CANARY-APPEND-c0ffee"]


def test_debug_log_never_contains_file_contents(mount_factory: Callable[..., Mounted]) -> None:
    """--debug logs every FUSE request; contents and xattr values must appear only as lengths."""
    m = mount_factory("--debug", "--block-size", "4096")
    root = m.mountpoint
    body = MARKERS[0] * 500
    write_file(root / "a", body)
    with open(root / "a", "ab") as f:
        f.write(MARKERS[2])
    os.setxattr(root / "a", "user.note", MARKERS[1])
    assert os.getxattr(root / "a", "user.note") == MARKERS[1]
    assert (root / "a").read_bytes() == body + MARKERS[2]
    os.truncate(root / "a", 3000)
    os.rename(root / "a", root / "b")
    with open(root / "b", "r+b") as f:
        f.seek(5000)
        f.write(MARKERS[0])
        f.flush()
        os.fsync(f.fileno())
    os.link(root / "b", root / "c")
    (root / "b").unlink()
    assert (root / "c").read_bytes()[5000:] == MARKERS[0]
    unmount(m)
    log = m.log_text()
    assert "op=write" in log and "op=setxattr" in log, "debug logging was not on: the test would prove nothing"
    for marker in MARKERS:
        assert marker.decode() not in log, f"log contains the content marker {marker.decode()}"
        assert marker.hex() not in log


def test_file_key_repr_and_pickle_never_show_key_bytes() -> None:
    raw = bytearray(os.urandom(KEY_BYTES))
    key = FileKey(raw)
    snapshot = bytes(raw)
    for text in (repr(key), str(key), f"{key!r}", repr([key]), repr({"k": key})):
        assert text.startswith("<FileKey") or "<FileKey destroyed=False>" in text
        assert snapshot.hex() not in text and repr(snapshot)[2:-1] not in text
    assert repr(key) == "<FileKey destroyed=False>"
    with pytest.raises(TypeError):
        pickle.dumps(key)
    assert not hasattr(key, "__dict__"), "a __dict__ would let vars()/debuggers dump the key"
    key.destroy()
    assert repr(key) == "<FileKey destroyed=True>"
    assert raw == bytearray(KEY_BYTES), "destroy() must overwrite the key buffer"
    with pytest.raises(IntegrityError) as info:
        key.seal(1, b"x", b"")
    assert snapshot.hex() not in str(info.value)
    key.destroy()  # idempotent


def test_integrity_errors_and_reprs_carry_no_plaintext(tmp_path: Path) -> None:
    """Messages of every integrity failure, and reprs of content objects, carry no data."""
    store = BlobStore.open(tmp_path)
    content = FileContent(store, 4096)
    secret = b"PLAINTEXT-MARKER-9d1e" * 400
    content.write(0, secret)
    assert "PLAINTEXT" not in repr(content)
    assert content.key is not None and content.blob_id is not None
    record = b"".join(blocks.seal_block(content.key, content.blob_id, 0, 7, secret[:4096]))
    failures: list[IntegrityError] = []
    for version, index, rec in [(8, 0, record), (7, 1, record), (7, 0, record[:-1]), (7, 0, record[:-1] + b"\0")]:
        with pytest.raises(IntegrityError) as info:
            blocks.open_block(content.key, content.blob_id, index, version, rec, 4096)
        failures.append(info.value)
    for e in failures:
        text = f"{e} {e!r} {e.reason}"
        assert "PLAINTEXT" not in text and secret[:64].hex() not in text and record[:32].hex() not in text
    content.destroy()
    assert [p.name for p in tmp_path.iterdir()] == [".scratchfs"]
    store.close()


def test_unmount_leaves_no_blob(scratch1: Mounted) -> None:
    for k in range(5):
        write_file(scratch1.mountpoint / f"f{k}", os.urandom(100_000))
    assert len(scratch1.blobs()) == 5
    unmount(scratch1)
    assert scratch1.blobs() == []
