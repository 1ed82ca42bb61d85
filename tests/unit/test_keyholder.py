"""scratchfs.keyholder without mounts: mountinfo decoding, pid liveness, readiness pipe, wipe, hardening."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from scratchfs.keyholder import mountinfo, procs, ready
from scratchfs.keyholder.wipe import wipe

# Two real lines as the kernel writes them: a space as \040, a backslash as \134, a UTF-8 name
# as raw bytes; the second has two optional fields before the "-".
MOUNTINFO = (
    b"36 35 98:0 / /mnt/a\\040b\\134c rw,noatime master:1 - ext3 /dev/my\\040disk rw,errors=continue\n"
    b"40 36 0:52 / /srv/scr\xc3\xa4tch\\040dir rw shared:7 master:3 - fuse.scratchfs scratchfs-77 rw,user_id=0\n"
    b"41 36 0:53 / /srv/scr\xc3\xa4tch\\040dir rw - tmpfs tmpfs rw\n"
)


def test_parse_decodes_octal_escapes_and_utf8() -> None:
    entries = mountinfo.parse(MOUNTINFO)
    assert [e.mountpoint for e in entries] == ["/mnt/a b\\c", "/srv/scrätch dir", "/srv/scrätch dir"]
    assert entries[0].source == "/dev/my disk" and entries[0].fstype == "ext3"
    assert entries[1].fstype == "fuse.scratchfs" and entries[1].source == "scratchfs-77"


def test_parse_skips_lines_it_cannot_read() -> None:
    assert mountinfo.parse(b"garbage\n\n1 2 3\n" + MOUNTINFO[:60]) == []


def test_find_last_match_wins_and_under_is_deepest_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table = tmp_path / "mountinfo"
    table.write_bytes(MOUNTINFO + b"42 41 0:54 / /srv/scr\xc3\xa4tch\\040dir/in rw - proc proc rw\n")
    monkeypatch.setattr(mountinfo, "MOUNTINFO", str(table))
    found = mountinfo.find("/srv/scrätch dir")
    assert found is not None and found.fstype == "tmpfs"  # stacked: the upper (last) one is visible
    assert mountinfo.find("/srv/scrätch") is None
    assert [e.fstype for e in mountinfo.under("/srv/scrätch dir")] == ["proc", "tmpfs", "fuse.scratchfs"]
    assert [e.fstype for e in mountinfo.under("/srv/scrätch dir", include_self=False)] == ["proc"]


def test_find_real_root_mount() -> None:
    assert mountinfo.find("/") is not None
    assert not mountinfo.is_stale("/")


def test_start_time_tells_a_reused_pid_apart() -> None:
    me = procs.start_time(os.getpid())
    assert me is not None and procs.alive(os.getpid(), me)
    assert not procs.alive(os.getpid(), me + 1)


def test_zombie_is_dead_and_wait_gone_reaps_it() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    started = procs.start_time(child.pid)
    deadline = time.monotonic() + 10
    while procs.alive(child.pid) and time.monotonic() < deadline:
        time.sleep(0.01)  # exited but not reaped: a zombie
    assert not procs.alive(child.pid)
    assert procs.wait_gone(child.pid, started, 5)
    child.returncode = 0  # reaped by wait_gone; keep Popen from waiting again


def test_stop_escalates_to_sigkill() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import signal,time; signal.signal(15, signal.SIG_IGN); "
                              "print(1, flush=True); time.sleep(60)"], stdout=subprocess.PIPE)
    assert child.stdout is not None and child.stdout.readline() == b"1\n"  # the SIGTERM handler is set
    sent: list[signal.Signals] = []
    try:
        started = procs.start_time(child.pid)
        assert procs.stop(child.pid, started, grace=0.1, patience=0.5, on_signal=lambda p, s: sent.append(s))
        assert sent == [signal.SIGTERM, signal.SIGKILL]
    finally:
        if child.poll() is None:
            child.kill()
        child.stdout.close()
        child.returncode = -9


def test_ready_words_round_trip() -> None:
    r, w = os.pipe()
    ready.write_ok(w)
    assert ready.read_word(r, 5) == ready.Word(True)
    os.close(r)
    r, w = os.pipe()
    ready.write_error(w, 11, "vol.img holds no ext4 filesystem;\nformat it")
    assert ready.read_word(r, 5) == ready.Word(False, 11, "vol.img holds no ext4 filesystem; format it")
    os.close(r)


def test_ready_silence_eof_and_garbage() -> None:
    r, w = os.pipe()
    t0 = time.monotonic()
    word = ready.read_word(r, 0.3)  # the writer lives but says nothing: bounded wait
    assert not word.ok and word.code is None and "no word" in word.message
    assert time.monotonic() - t0 < 3
    os.write(w, b"x" * 10_000)
    os.close(w)
    word = ready.read_word(r, 5)  # a flood ends at MAX_LINE, not at memory exhaustion
    assert not word.ok and word.code is None
    os.close(r)
    r, w = os.pipe()
    os.close(w)
    assert ready.read_word(r, 5) == ready.Word(False, None, "exited without a word")
    os.close(r)


async def test_ready_async_reader() -> None:
    r, w = os.pipe()
    os.set_blocking(r, False)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, ready.write_error, w, 6, "kernel refused")
            assert await ready.read_word_async(r, 5) == ready.Word(False, 6, "kernel refused")
        assert (await ready.read_word_async(r, 5)).message == "exited without a word"
    finally:
        os.close(r)
    r2, w2 = os.pipe()
    try:
        assert "no word within" in (await ready.read_word_async(r2, 0.2)).message
    finally:
        os.close(r2)
        os.close(w2)


def test_wipe_bytearray_and_views() -> None:
    key = bytearray(b"k" * 32)
    wipe(key)
    assert key == bytearray(32)
    buf = bytearray(b"abcdefgh")
    wipe(memoryview(buf)[2:6])
    assert buf == bytearray(b"ab\0\0\0\0gh")
    wide = bytearray(b"\xff" * 16)
    wipe(memoryview(wide).cast("I"))
    assert wide == bytearray(16)
    with pytest.raises(TypeError):
        wipe(memoryview(b"immutable"))


HARDEN_PROBE = """
import json, os, signal
from scratchfs.keyholder import hardening
before = hardening.is_dumpable()
h = hardening.harden_process()
limits = [l for l in open("/proc/self/limits") if l.startswith("Max core file size")][0].split()[4:6]
vmlck = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmLck:")][0]
wrong_parent = hardening.die_with_parent(signal.SIGTERM, os.getppid() + 1)
print(json.dumps([before, hardening.is_dumpable(), h.core_limit, h.non_dumpable, h.memory_locked,
                  limits, vmlck, wrong_parent, hardening.die_with_parent(signal.SIGTERM, os.getppid())]))
"""


def test_harden_process_takes_effect_and_is_checked() -> None:
    import json

    out = subprocess.run([sys.executable, "-c", HARDEN_PROBE], capture_output=True, text=True, timeout=30, check=True)
    before, after, core, non_dumpable, locked, limits, vmlck, wrong_parent, right_parent = json.loads(out.stdout)
    assert before and not after and core and non_dumpable
    assert limits == ["0", "0"]
    if os.geteuid() == 0:  # CAP_IPC_LOCK: mlockall must succeed
        assert locked and vmlck > 0
    assert not wrong_parent and right_parent
