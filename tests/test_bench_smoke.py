"""Smoke tests of the benchmark harness (tools/bench): tiny sizes, real mounts, no timing.

They check that the harness runs every workload over every target, writes its outputs, and
leaves nothing behind (no mount, no process, no tmpfs), also when interrupted.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scratchfs.keyholder import mountinfo
from tools.bench.report import METRICS, Metric, goals, ratio

ROOT = Path(__file__).resolve().parent.parent
BENCH = [sys.executable, "-m", "tools.bench"]

needs_root_fuse = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse") or shutil.which("fio") is None,
    reason="the harness needs root, /dev/fuse and fio",
)


def mounts_under(prefix: Path) -> list[str]:
    return [e.mountpoint for e in mountinfo.under(prefix)]


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains *text* (our unique work directory)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            found.append(int(entry))
    return found


def assert_nothing_left(work: Path) -> None:
    assert mounts_under(work) == [], "the harness left mounts behind"
    assert list(work.iterdir()) == [], "the harness left its tmpfs directory behind"
    assert processes_mentioning(str(work)) == [], "the harness left processes behind"


@needs_root_fuse
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_run_over_all_targets(tmp_path: Path) -> None:
    targets = ["tmpfs", "zerofs", "passthrough", "gocryptfs", "scratchfs", "scratchfs-agent"]
    if shutil.which("gocryptfs") is None:
        # Not a silent pass: the reason shows in the test output (-ra).
        targets.remove("gocryptfs")
        print("gocryptfs target skipped: gocryptfs binary not installed (make apt)")
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "out"
    r = subprocess.run(
        [*BENCH, "--quick", "--targets", ",".join(targets), "--block-sizes", "16K",
         "--workdir", str(work), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=840, check=False,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((out / "latest.json").read_text())
    md = (out / "latest.md").read_text()
    assert len(list(out.glob("bench-*.json"))) == 1
    assert len(list(out.glob("bench-*.md"))) == 1
    assert "| metric | unit |" in r.stdout, "the table was not printed"
    all_targets = [*targets, "scratchfs-bs16K"]
    assert doc["targets"] == all_targets
    assert doc["errors"] == []
    for t in all_targets:
        med = doc["medians"][t]
        for key in ("stream_write", "stream_read", "randwrite_1j", "randread_1j",
                    "randwrite_4j", "randread_4j", "tree_extract", "tree_ls", "tree_rm",
                    "files_create", "scan_write", "scan_upload", "scan_shred", "scan_total"):
            assert med[key] > 0, (t, key)
        if t.startswith("scratchfs"):
            # The daemon's own request counts, per phase (scale 0.01: 20 result files).
            assert med["req.scan_write.create"] >= 20, t
            assert med["req.tree_ls.total"] > 0 and med["req.stream_read.read"] > 0, t
        if t != "tmpfs":
            # Every daemon's memory was read from /proc.
            assert med["rss_tree"] > 0 and med["rss_files"] > 0, t
        assert t in md
    assert "scratchfs/gocryptfs" in doc["ratios"] or "gocryptfs" not in targets
    assert set(doc["ratios"]) >= {"scratchfs/passthrough", "scratchfs/zerofs"}
    assert "scratchfs block-size sweep" in md
    assert "FUSE requests per workload" in md
    assert "scratchfs-agent/zerofs" in doc["ratios"]
    assert doc["meta"]["tarball_files"] == 200
    assert_nothing_left(work)


def harness_state(pid: int, work: Path) -> str:
    """What the harness and everything it started are doing: for a failure message."""
    lines = []
    for p in [pid, *processes_mentioning(str(work))]:
        try:
            wchan = Path(f"/proc/{p}/wchan").read_text()
            stat = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
            stack = Path(f"/proc/{p}/stack").read_text().strip().replace("\n", " < ")
        except OSError:
            continue
        cmd = " ".join(mountinfo_cmd(p))[:100]
        lines.append(f"pid {p} state {stat} wchan {wchan} [{cmd}] stack: {stack[:300]}")
    lines.append(f"mounts under the work dir: {mounts_under(work)}")
    return "\n".join(lines)


def mountinfo_cmd(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


@needs_root_fuse
@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("phase", ["mounting", "fio"])
def test_interrupt_cleans_up(tmp_path: Path, phase: str) -> None:
    """SIGINT while the daemon starts or while fio runs inside the mount: the harness exits
    130 within a bound, with a clean (not lazy) unmount and nothing left running."""
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [*BENCH, "--quick", "--targets", "zerofs", "--workloads", "fio",
         "--fio-runtime", "60", "--workdir", str(work), "--out", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    seen: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            seen.append(line)
            if line.rstrip().endswith(f"zerofs: {phase}"):
                break
        else:
            pytest.fail(f"the harness never reached the {phase} phase: {''.join(seen)[-2000:]}")
        if phase == "fio":
            # Interrupt once fio's job processes run inside the mount (they outlive a
            # killed fio unless the harness ends them too).
            deadline = time.monotonic() + 60
            while not any("fio" in " ".join(mountinfo_cmd(p))
                          for p in processes_mentioning(str(work))):
                assert time.monotonic() < deadline, "fio never started"
                time.sleep(0.05)
            time.sleep(0.5)
            assert mounts_under(work), "expected the zerofs mount to be live"
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("the harness did not exit within 60 s of SIGINT; it and its children "
                        f"were doing:\n{harness_state(proc.pid, work)}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = "".join(seen) + err
    assert proc.returncode == 130, err
    assert "lazily" not in err and "still running" not in err, err
    assert (out / "latest.json").exists()
    assert json.loads((out / "latest.json").read_text())["interrupted"] is True
    assert_nothing_left(work)


def test_kill_tree_ends_workers_in_their_own_sessions() -> None:
    """fio's jobs call setsid(): a group kill misses them, a tree kill must not."""
    from scratchfs.keyholder import procs
    from tools.children import kill_tree

    script = ("import os, subprocess, sys, time\n"
              "subprocess.Popen([sys.executable, '-c', 'import os, time; os.setsid(); "
              "time.sleep(60)'])\n"
              "time.sleep(60)\n")
    leader = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            workers = list(procs.descendants(leader.pid))
            if workers and os.getsid(workers[0]) != leader.pid:
                break  # the worker runs in a session of its own, as fio's jobs do
            assert time.monotonic() < deadline, "the worker never started its own session"
            time.sleep(0.02)
        (worker,) = workers
        assert kill_tree(leader.pid, leader) == []
        assert not procs.alive(worker) and leader.poll() is not None
    finally:
        if leader.poll() is None:
            leader.kill()
            leader.wait()


def test_usage_errors_are_one_line_exit_2(tmp_path: Path) -> None:
    for args in (["--targets", "nosuchfs"], ["--workloads", "bogus"], ["--rounds", "0"]):
        r = subprocess.run([*BENCH, *args, "--out", str(tmp_path)], cwd=ROOT,
                           capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("tools.bench: "), r.stderr
        assert "Traceback" not in r.stderr


def test_ratio_directions() -> None:
    by_key = {m.key: m for m in METRICS}
    # Throughput: more is faster.
    assert ratio(by_key["stream_read"], 200.0, 100.0) == 2.0
    # Durations: less is faster, so half the time is a speed ratio of 2.
    assert ratio(by_key["tree_ls"], 1.0, 2.0) == 2.0
    # Memory: plain size ratio.
    assert ratio(by_key["rss_files"], 50.0, 100.0) == 0.5
    assert ratio(Metric("x", "x", "MB/s", "rate"), 1.0, 0.0) is None


def test_goals_use_the_issue_thresholds() -> None:
    med = {
        "scratchfs": {"tree_extract": 10.0, "tree_ls": 1.0, "rss_files": 151.0},
        "scratchfs-agent": {"stream_write": 105.0, "tree_extract": 1.0, "tree_rm": 1.0, "randread_1j": 80.0},
        "gocryptfs": {"stream_write": 100.0, "tree_extract": 1.5, "tree_ls": 0.8},
        "zerofs": {"randread_1j": 100.0, "tree_rm": 0.95},
    }
    default = {g["metric"]: g for g in goals(med, "scratchfs")}
    assert default["tree_extract"]["met"] is False  # 0.15x gocryptfs < 0.8x
    assert default["tree_ls"]["met"] is True  # 0.8x
    assert default["rss_files"]["met"] is False  # over 150 MiB
    assert "stream_write" not in default  # the speed goals are the agent's mount's
    agent = {g["metric"]: g for g in goals(med, "scratchfs-agent")}
    assert agent["stream_write"]["met"] is False  # 1.05x < 1.1x
    assert agent["tree_extract"]["met"] is True  # 1.5x >= 1.4x
    assert agent["tree_rm"]["met"] is True and agent["tree_rm"]["versus"] == "zerofs"  # 0.95x
    assert agent["randread_1j"]["met"] is True  # 0.8x the zero-work floor
