"""The benchmark workloads: each runs inside one mounted target and returns measured numbers.

Every number is measured from the outside, the way a user of the mount sees it: wall-clock
time of real syscalls and real tools (fio, tar, ls, rm), and the daemon's resident memory
read from /proc/PID/status. Units: MB/s is 10^6 bytes per second (as fio's "MB/s"),
durations in seconds, memory in MiB.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import random
import shutil
import sqlite3
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tools import children

log = logging.getLogger(__name__)

MIB = 1 << 20
CHUNK = MIB
# Generous bounds: a hung filesystem must fail the measurement, not hang the harness.
TOOL_TIMEOUT = 1800.0
DROP_CACHES_TIMEOUT = 120.0

WORKLOADS = ("stream", "fio", "tree", "files", "scan")


@dataclass(frozen=True)
class Sizes:
    """How big each workload is (the issue's sizes by default, tiny ones with --quick)."""

    stream_bytes: int = 1 << 30
    fio_file_bytes: int = 256 * MIB
    fio_runtime_s: float = 5.0
    tree_files: int = 6000
    empty_files: int = 100_000
    scan_scale: float = 1.0  # fraction of one simulated scan job (scan workload)


class WorkloadError(RuntimeError):
    """A workload could not be measured (tool failed, filesystem returned an error)."""


_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(path: Path) -> None:
    """Flush dirty data of the filesystem holding *path* only (a global sync could block on
    other people's mounts)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs({path}) failed: {os.strerror(err)}")
    finally:
        os.close(fd)


def drop_caches(path: Path) -> None:
    """Write back *path*'s filesystem, then drop the page cache, dentries and inodes.

    The drop runs in a child process, bounded: it takes every superblock's s_umount lock,
    so one wedged mount elsewhere on the machine (an unmount waiting on a stopped FUSE
    daemon) would otherwise block the harness, and its Ctrl-C, for as long as that lasts."""
    syncfs(path)
    run_tool(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], "drop_caches",
             timeout=DROP_CACHES_TIMEOUT)


def run_tool(argv: list[str], what: str, stdout: int | None = subprocess.DEVNULL,
             timeout: float | None = None) -> str:
    """Run an external tool in its own session (Ctrl-C reaches only the harness, which then
    cleans up); raise WorkloadError with its stderr on failure.

    However the call ends (exit, timeout, Ctrl-C, SIGTERM), the tool's whole process group
    is killed before we return: fio's forked job processes outlive a killed fio and would
    keep the mount busy."""
    limit = TOOL_TIMEOUT if timeout is None else timeout
    with subprocess.Popen(argv, stdout=stdout, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            raise WorkloadError(f"{what}: timed out after {limit:.0f} s") from None
        finally:
            left = children.kill_tree(proc.pid, proc)
            if left:
                log.warning("event=tool_survivors tool=%s pids=%s", argv[0], left)
    if proc.returncode != 0:
        tail = " | ".join(err.strip().splitlines()[-3:])
        raise WorkloadError(f"{what}: exit {proc.returncode}: {tail}")
    return out or ""


def timed_tool(argv: list[str], what: str) -> float:
    """Seconds taken by one run of an external tool."""
    t0 = time.perf_counter()
    run_tool(argv, what)
    return time.perf_counter() - t0


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time used so far by process *pid* (all its threads), or 0."""
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # Fields 14 and 15 of stat(5) (utime, stime); index 11, 12 after the command name.
    return (int(fields[11]) + int(fields[12])) / _TICK


# -- request counts -------------------------------------------------------------------------
Counter = Callable[[], "dict[str, int] | None"]
DAEMON_CPU = "daemon_cpu_us"  # not an operation: the daemon's CPU time in a phase


@contextmanager
def counted(res: dict[str, float], phase: str, counter: Counter | None,
            pid: int | None = None) -> Iterator[None]:
    """Record the requests the daemon served during the block as ``req.<phase>.<op>`` and
    ``req.<phase>.total``, and the daemon's CPU time in the block as
    ``req.<phase>.daemon_cpu_us`` (only for a daemon that counts, i.e. scratchfs). Counts are
    deterministic where times on a shared machine are not; CPU per request shows which
    requests cost."""
    before = counter() if counter is not None else None
    cpu_before = cpu_seconds(pid) if before is not None else 0.0
    yield
    if before is None or counter is None:
        return
    cpu = cpu_seconds(pid) - cpu_before
    after = counter() or {}
    total = 0
    for op, n in after.items():
        delta = n - before.get(op, 0)
        if delta:
            res[f"req.{phase}.{op}"] = float(delta)
            total += delta
    res[f"req.{phase}.total"] = float(total)
    if pid is not None:
        res[f"req.{phase}.{DAEMON_CPU}"] = cpu * 1e6


# -- 1. streaming ----------------------------------------------------------------------------
def stream(mnt: Path, sizes: Sizes, pid: int | None = None,
           counter: Counter | None = None) -> dict[str, float]:
    """Write stream_bytes in 1 MiB writes then fsync; drop caches; read it back, fresh open.

    With a daemon *pid*, also its CPU time per MiB moved (robust on a busy machine)."""
    path = mnt / "stream.bin"
    buf = os.urandom(CHUNK)
    n = max(1, sizes.stream_bytes // CHUNK)
    total = n * CHUNK
    drop_caches(mnt)
    counts: dict[str, float] = {}
    with counted(counts, "stream_write", counter, pid):
        c0 = cpu_seconds(pid)
        t0 = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for _ in range(n):
                if os.write(fd, buf) != CHUNK:
                    raise WorkloadError("stream write: short write")
            os.fsync(fd)
        finally:
            os.close(fd)
        t_write = time.perf_counter() - t0
        c_write = cpu_seconds(pid) - c0

    drop_caches(mnt)
    rbuf = bytearray(CHUNK)
    got = 0
    with counted(counts, "stream_read", counter, pid):
        c0 = cpu_seconds(pid)
        t0 = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            while True:
                k = f.readinto(rbuf)
                if not k:
                    break
                got += k
        t_read = time.perf_counter() - t0
        c_read = cpu_seconds(pid) - c0
    if got != total:
        raise WorkloadError(f"stream read: read {got} bytes, wrote {total}")
    path.unlink()
    res = {
        "stream_write": total / t_write / 1e6,
        "stream_read": total / t_read / 1e6,
        **counts,
    }
    if pid is not None:
        res["stream_write_cpu_us_per_mib"] = c_write / (total / MIB) * 1e6
        res["stream_read_cpu_us_per_mib"] = c_read / (total / MIB) * 1e6
    return res


# -- 2. fio ------------------------------------------------------------------------------------
def _fio(mnt: Path, sizes: Sizes, rw: str, jobs: int, direct: bool,
         pid: int | None) -> dict[str, float]:
    argv = [
        "fio", "--name=bench", f"--filename={mnt / 'fio.bin'}", f"--size={sizes.fio_file_bytes}",
        "--bs=4k", f"--rw={rw}", "--ioengine=psync", "--iodepth=1", f"--numjobs={jobs}",
        f"--direct={int(direct)}", "--group_reporting", "--time_based",
        f"--runtime={max(1, round(sizes.fio_runtime_s * 1000))}ms", "--randrepeat=0",
        "--output-format=json",
    ]
    c0 = cpu_seconds(pid)
    out = run_tool(argv, f"fio {rw} numjobs={jobs}", stdout=subprocess.PIPE)
    cpu = cpu_seconds(pid) - c0
    try:
        # fio may print notes before the JSON document.
        doc = json.loads(out[out.index("{"):])
        side = doc["jobs"][0]["read" if rw == "randread" else "write"]
        res = {
            "MBps": float(side["bw_bytes"]) / 1e6,
            "iops": float(side["iops"]),
            "lat_us": float(side["lat_ns"]["mean"]) / 1e3,
        }
        if pid is not None and side["total_ios"]:
            res["cpu_us"] = cpu / float(side["total_ios"]) * 1e6
        return res
    except (ValueError, KeyError, IndexError) as e:
        raise WorkloadError(f"fio {rw}: cannot parse its JSON output: {e}") from None


def fio(mnt: Path, sizes: Sizes, direct: bool = True, pid: int | None = None) -> dict[str, float]:
    """4 KiB random write then random read on one file, 1 job (QD1) then 4 parallel jobs.

    The file is first written in full (untimed): fio would otherwise lay it out inside the
    first read run, and a first randwrite would land in holes. With a daemon *pid*, also its
    CPU time per request (robust on a busy machine)."""
    path = mnt / "fio.bin"
    buf = os.urandom(CHUNK)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = sizes.fio_file_bytes
        while left > 0:
            left -= os.write(fd, buf[:min(CHUNK, left)])
        os.fsync(fd)
    finally:
        os.close(fd)
    res: dict[str, float] = {}
    for jobs in (1, 4):
        for rw in ("randwrite", "randread"):
            drop_caches(mnt)
            r = _fio(mnt, sizes, rw, jobs, direct, pid)
            key = f"{rw}_{jobs}j"
            res[key] = r["MBps"]
            for k in ("iops", "lat_us", "cpu_us"):
                if k in r:
                    res[f"{key}_{k}"] = r[k]
    (mnt / "fio.bin").unlink()
    return res


# -- 3 and 4. small-file tree and memory -----------------------------------------------------
def build_tarball(dest: Path, nfiles: int) -> tuple[int, int]:
    """An uncompressed tarball of the first *nfiles* files (<= 256 KiB each) of the Python
    standard library, in sorted walk order. Returns (files, bytes)."""
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    picked: list[Path] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames.sort()
        if Path(dirpath) == stdlib and "site-packages" in dirnames:
            dirnames.remove("site-packages")
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.is_symlink() or not p.is_file():
                continue
            size = p.stat().st_size
            if size > 256 * 1024:
                continue
            picked.append(p)
            total += size
            if len(picked) >= nfiles:
                break
        if len(picked) >= nfiles:
            break
    with tarfile.open(dest, "w", format=tarfile.GNU_FORMAT) as tar:
        for p in picked:
            tar.add(p, arcname=str(p.relative_to(stdlib)), recursive=False)
    return len(picked), total


def read_status_kib(pid: int, field: str) -> int:
    """One memory field of /proc/PID/status (VmRSS, VmHWM) in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise WorkloadError(f"/proc/{pid}/status has no {field}")


class RssPeak:
    """Peak resident memory of one process over a stretch of time.

    Resets the kernel's high-water mark (``echo 5 > /proc/PID/clear_refs``) at the start, so
    start-up costs (e.g. gocryptfs's scrypt) do not count, and also samples VmRSS every 20 ms
    as a cross-check. The peak is the larger of the two."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.sampled_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                self.sampled_kib = max(self.sampled_kib, read_status_kib(self.pid, "VmRSS"))
            except (OSError, WorkloadError):
                return
            self._stop.wait(0.02)

    def __enter__(self) -> RssPeak:
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                f.write("5\n")
        except OSError as e:
            log.warning("event=clear_refs_failed pid=%d error=%s", self.pid, e)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def peak_mib(self) -> float:
        """Peak RSS in MiB (call after the with-block)."""
        hwm = read_status_kib(self.pid, "VmHWM")
        return max(hwm, self.sampled_kib) / 1024


@contextmanager
def rss_peak(pid: int | None) -> Iterator[RssPeak | None]:
    """RssPeak for a daemon, or nothing for a target without one (raw tmpfs)."""
    if pid is None:
        yield None
        return
    with RssPeak(pid) as r:
        yield r


def tree(mnt: Path, tarball: Path, pid: int | None,
         counter: Counter | None = None) -> dict[str, float]:
    """Extract the tarball, ``ls -lR`` it, ``rm -rf`` it: each from a cold cache."""
    dest = mnt / "tree"
    dest.mkdir()
    res: dict[str, float] = {}
    with rss_peak(pid) as peak:
        drop_caches(mnt)
        with counted(res, "tree_extract", counter, pid):
            # tar's own fsync-free extract; syncfs inside the count so that writes the kernel
            # still holds (writeback cache) are counted in the phase that made them.
            res["tree_extract"] = timed_tool(["tar", "-xf", str(tarball), "-C", str(dest)],
                                             "tar extract")
            syncfs(mnt)
        drop_caches(mnt)
        with counted(res, "tree_ls", counter, pid):
            res["tree_ls"] = timed_tool(["ls", "-lR", str(dest)], "ls -lR")
        drop_caches(mnt)
        with counted(res, "tree_rm", counter, pid):
            res["tree_rm"] = timed_tool(["rm", "-rf", str(dest)], "rm -rf")
    if peak is not None:
        res["rss_tree"] = peak.peak_mib()
    if dest.exists():
        raise WorkloadError("rm -rf left the tree behind")
    return res


def files(mnt: Path, count: int, pid: int | None,
          counter: Counter | None = None) -> dict[str, float]:
    """Create *count* empty files (1,000 per directory); the daemon's peak RSS meanwhile and
    with all of them present; then remove them."""
    root = mnt / "files"
    root.mkdir()
    res: dict[str, float] = {}
    per_dir = 1000
    with rss_peak(pid) as peak, counted(res, "files_create", counter, pid):
        t0 = time.perf_counter()
        for d in range(0, count, per_dir):
            sub = root / f"d{d // per_dir:04d}"
            sub.mkdir()
            base = str(sub) + "/f"
            for i in range(min(per_dir, count - d)):
                os.close(os.open(f"{base}{i:04d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        res["files_create"] = time.perf_counter() - t0
    if peak is not None:
        res["rss_files"] = peak.peak_mib()
        res["rss_files_now"] = read_status_kib(pid, "VmRSS") / 1024 if pid else 0.0
    t0 = time.perf_counter()
    run_tool(["rm", "-rf", str(root)], "rm -rf files")
    res["files_rm"] = time.perf_counter() - t0
    return res


# -- 5. the agent's real workload ------------------------------------------------------------
SCAN_RESULT_FILES = 2000
SCAN_STREAM_BYTES = 256 * MIB
SCAN_INSERTS = 50_000
SCAN_COMMIT_EVERY = 1000
SCAN_WRITE = 4096


def scan(mnt: Path, sizes: Sizes, pid: int | None,
         counter: Counter | None = None) -> dict[str, float]:
    """One simulated scan job, as the agent runs it on its scratch mount.

    write: 2,000 result files of 1-64 KiB written with 4 KiB write(2) calls, one 256 MiB
    capture streamed in 1 MiB writes, an SQLite database filled with 50,000 inserts
    (committed every 1,000, default rollback journal), then syncfs so that data the kernel
    still holds is paid for here; upload: every file read once (1 MiB reads, no cache drop:
    the agent uploads what it just wrote); shred: rm -rf of the job. Everything scales with
    ``sizes.scan_scale``. Seconds per phase and in total; same random sizes on every target."""
    scale = sizes.scan_scale
    nfiles = max(1, round(SCAN_RESULT_FILES * scale))
    stream_chunks = max(1, round(SCAN_STREAM_BYTES * scale / CHUNK))
    inserts = max(1, round(SCAN_INSERTS * scale))
    rng = random.Random(20261201)
    payload = os.urandom(64 * 1024)
    job = mnt / "job"
    res: dict[str, float] = {}
    drop_caches(mnt)
    t_start = time.perf_counter()
    with counted(res, "scan_write", counter, pid):
        (job / "results").mkdir(parents=True)
        for i in range(nfiles):
            size = rng.randint(1024, 64 * 1024)
            fd = os.open(job / "results" / f"r{i:05d}.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                         0o600)
            try:
                for off in range(0, size, SCAN_WRITE):
                    os.write(fd, payload[off:min(size, off + SCAN_WRITE)])
            finally:
                os.close(fd)
        fd = os.open(job / "capture.pcap", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            chunk = os.urandom(CHUNK)
            for _ in range(stream_chunks):
                os.write(fd, chunk)
        finally:
            os.close(fd)
        db = sqlite3.connect(job / "findings.db")
        try:
            db.execute("CREATE TABLE finding (id INTEGER PRIMARY KEY, host TEXT, port INTEGER,"
                       " service TEXT, banner BLOB)")
            for i in range(inserts):
                db.execute("INSERT INTO finding (host, port, service, banner) VALUES (?,?,?,?)",
                           (f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", rng.randint(1, 65535),
                            "tcp", payload[:rng.randint(16, 256)]))
                if i % SCAN_COMMIT_EVERY == SCAN_COMMIT_EVERY - 1:
                    db.commit()
            db.commit()
        finally:
            db.close()
        syncfs(mnt)
    t_written = time.perf_counter()
    with counted(res, "scan_upload", counter, pid):
        rbuf = bytearray(CHUNK)
        for dirpath, _, names in os.walk(job):
            for name in names:
                with open(os.path.join(dirpath, name), "rb", buffering=0) as f:
                    while f.readinto(rbuf):
                        pass
    t_uploaded = time.perf_counter()
    with counted(res, "scan_shred", counter, pid):
        run_tool(["rm", "-rf", str(job)], "rm -rf job")
    t_end = time.perf_counter()
    if job.exists():
        raise WorkloadError("rm -rf left the scan job behind")
    res.update({"scan_write": t_written - t_start, "scan_upload": t_uploaded - t_written,
                "scan_shred": t_end - t_uploaded, "scan_total": t_end - t_start})
    return res


def idle_rss(pid: int | None) -> dict[str, float]:
    """The daemon's RSS right after mounting."""
    if pid is None:
        return {}
    return {"rss_idle": read_status_kib(pid, "VmRSS") / 1024}


def clear_dir(path: Path) -> None:
    """Remove everything below *path* (between rounds, so the tmpfs does not fill up)."""
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
