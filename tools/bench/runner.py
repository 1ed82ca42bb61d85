"""Targets (what gets mounted) and the run loop (rounds interleaved across targets).

One tmpfs, mounted by the harness on a fresh temporary directory, holds every backing
directory, every mount point and the tarball. Each target is mounted fresh for each round and
unmounted after it. Whatever happens (an error, Ctrl-C, SIGTERM), every mount is taken down,
every process the harness started is stopped by its PID, and the tmpfs is unmounted.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from scratchfs.keyholder import mountinfo, procs
from tools import children
from tools.bench import workloads
from tools.bench.workloads import Sizes, WorkloadError

log = logging.getLogger(__name__)

Progress = Callable[[str], None]

MOUNT_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
STATS_TIMEOUT = 10.0
BASE_TARGETS = ("tmpfs", "zerofs", "passthrough", "gocryptfs", "scratchfs", "scratchfs-agent")


class BenchError(RuntimeError):
    """The benchmark cannot run at all (environment, usage); message is user-facing."""


class Interrupted(BaseException):
    """SIGTERM arrived: unwind like Ctrl-C so that every finally-block cleans up."""


# -- mount helpers ----------------------------------------------------------------------------
def mount_fstype(path: Path) -> str | None:
    """The filesystem type mounted exactly at *path*, or None."""
    entry = mountinfo.find(path)
    return entry.fstype if entry is not None else None


def mounts_under(prefix: Path) -> list[str]:
    """Every mount point at or below *prefix*."""
    return [e.mountpoint for e in mountinfo.under(prefix)]


def pid_alive(pid: int) -> bool:
    """True unless the process is gone or a zombie."""
    return procs.alive(pid)


def wait_gone(pid: int, proc: subprocess.Popen[bytes] | None, timeout: float) -> bool:
    """Wait until *pid* exits (reaping it if it is our child)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return True
        if proc is None and not pid_alive(pid):
            return True
        time.sleep(0.02)
    return False


def stop_pid(pid: int, proc: subprocess.Popen[bytes] | None) -> list[str]:
    """Make sure *pid* is gone: wait, then SIGTERM, then SIGKILL. Returns problems seen."""
    problems: list[str] = []
    if wait_gone(pid, proc, STOP_TIMEOUT / 2):
        return problems
    problems.append(f"pid {pid} still running after unmount; sent SIGTERM")
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return problems
    if wait_gone(pid, proc, STOP_TIMEOUT / 2):
        return problems
    problems.append(f"pid {pid} ignored SIGTERM; sent SIGKILL")
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return problems
    wait_gone(pid, proc, STOP_TIMEOUT)
    return problems


def fuse_unmount(mnt: Path) -> list[str]:
    """fusermount3 -u; lazily (-z) if busy. Returns problems seen."""
    if mount_fstype(mnt) is None:
        return []
    r = subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, text=True,
                       check=False, timeout=30)
    if r.returncode == 0:
        return []
    subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, check=False,
                   timeout=30)
    return [f"fusermount3 -u {mnt} failed ({r.stderr.strip()}); unmounted lazily"]


def wait_mounted(mnt: Path, proc: subprocess.Popen[bytes] | None, log_path: Path,
                 what: str) -> None:
    """Wait until a FUSE filesystem is mounted on *mnt*, or fail with its log."""
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while time.monotonic() < deadline:
        fstype = mount_fstype(mnt)
        if fstype is not None and fstype.startswith("fuse"):
            return
        if proc is not None and proc.poll() is not None:
            raise WorkloadError(f"{what} exited with {proc.returncode} before mounting: "
                                f"{tail(log_path)}")
        time.sleep(0.02)
    raise WorkloadError(f"{what} did not mount within {MOUNT_TIMEOUT:.0f} s: {tail(log_path)}")


def tail(path: Path, lines: int = 5) -> str:
    """Last lines of a log file, on one line."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return " | ".join(text.strip().splitlines()[-lines:])


# -- targets --------------------------------------------------------------------------------
@dataclass
class Target:
    """Something mounted over a backing directory on the tmpfs. Raw tmpfs is the base class."""

    name: str
    base: Path = field(default=Path("/nonexistent"))
    pid: int | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def backing(self) -> Path:
        return self.base / "backing"

    @property
    def mnt(self) -> Path:
        return self.base / "mnt"

    @property
    def log_path(self) -> Path:
        return self.base / f"{self.name}.log"

    def available(self) -> str | None:
        """None if the target can run here, else why not."""
        return None

    def describe(self) -> dict[str, Any]:
        """What this target is (recorded in the JSON)."""
        return {"kind": "raw tmpfs directory"}

    def start(self, base: Path) -> None:
        """Create the backing directory and mount the target."""
        self.base = base
        self.backing.mkdir(parents=True)

    @property
    def workdir(self) -> Path:
        """Where the workloads run."""
        return self.backing

    def stop(self) -> list[str]:
        """Unmount and stop the daemon; idempotent. Returns problems seen."""
        return []

    def request_counts(self) -> dict[str, int] | None:
        """The daemon's own per-operation request counts so far, if it keeps any."""
        return None


@dataclass
class MountedTarget(Target):
    """A FUSE file system mounted on mnt: the workloads run inside the mount."""

    @property
    def workdir(self) -> Path:
        return self.mnt


@dataclass
class ForegroundDaemonTarget(MountedTarget):
    """A FUSE daemon we started in the foreground and own by PID."""

    def stop(self) -> list[str]:
        problems = fuse_unmount(self.mnt)
        if self.pid is not None:
            problems += stop_pid(self.pid, self.proc)
        self.pid = None
        self.proc = None
        return problems


@dataclass
class PyfuseTarget(ForegroundDaemonTarget):
    """zerofs or passthrough from this package, each its own foreground process."""

    module: str = ""
    extra: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {"kind": f"python -m {self.module}", "options": self.extra}

    def start(self, base: Path) -> None:
        super().start(base)
        self.mnt.mkdir()
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module, str(self.backing), str(self.mnt),
                 "--log-file", str(self.log_path), *self.extra],
                stdout=logf, stderr=logf, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        self.pid = self.proc.pid
        wait_mounted(self.mnt, self.proc, self.log_path, self.name)



@dataclass
class GocryptfsTarget(ForegroundDaemonTarget):
    """gocryptfs over the backing directory, in the foreground (-fg) so we own its PID."""

    extra: list[str] = field(default_factory=list)

    def available(self) -> str | None:
        if shutil.which("gocryptfs") is None:
            return "gocryptfs binary not found; install it (make apt)"
        return None

    def describe(self) -> dict[str, Any]:
        v = subprocess.run(["gocryptfs", "-version"], capture_output=True, text=True,
                           check=False, timeout=30)
        return {"kind": "gocryptfs", "version": v.stdout.strip(), "options": self.extra}

    def start(self, base: Path) -> None:
        super().start(base)
        self.mnt.mkdir()
        passfile = self.base / "passfile"
        # A fresh random password per mount, in the tmpfs, readable by root only, removed
        # as soon as the mount is live.
        fd = os.open(passfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        try:
            r = subprocess.run(
                ["gocryptfs", "-init", "-q", "-passfile", str(passfile), str(self.backing)],
                capture_output=True, text=True, check=False, timeout=120,
                start_new_session=True,
            )
            if r.returncode != 0:
                raise WorkloadError(f"gocryptfs -init failed: {r.stderr.strip()}")
            with open(self.log_path, "ab") as logf:
                self.proc = subprocess.Popen(
                    ["gocryptfs", "-fg", "-q", "-passfile", str(passfile), *self.extra,
                     str(self.backing), str(self.mnt)],
                    stdout=logf, stderr=logf, stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            self.pid = self.proc.pid
            wait_mounted(self.mnt, self.proc, self.log_path, self.name)
        finally:
            passfile.unlink()



@dataclass
class ScratchfsTarget(MountedTarget):
    """scratchfs through its CLI (daemonizes, writes a pid file, returns once live)."""

    block_size: int | None = None
    extra: list[str] = field(default_factory=list)

    def available(self) -> str | None:
        if importlib.util.find_spec("scratchfs.__main__") is None:
            return "scratchfs has no CLI yet (python -m scratchfs)"
        return None

    def describe(self) -> dict[str, Any]:
        return {"kind": "python -m scratchfs", "block_size": self.block_size,
                "options": self.extra}

    def start(self, base: Path) -> None:
        super().start(base)
        self.mnt.mkdir()
        pid_file = self.base / "scratchfs.pid"
        argv = [sys.executable, "-m", "scratchfs", "mount", str(self.backing), str(self.mnt),
                "--pid-file", str(pid_file), "--log-file", str(self.log_path),
                "--stats-file", str(self.stats_path)]
        if self.block_size:
            argv += ["--block-size", str(self.block_size)]
        argv += self.extra
        r = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120,
                           start_new_session=True)
        if pid_file.exists():
            try:
                self.pid = int(pid_file.read_text().strip())
            except ValueError:
                self.pid = None
        if r.returncode != 0:
            raise WorkloadError(f"scratchfs mount failed ({r.returncode}): {r.stderr.strip()}")
        if self.pid is None:
            raise WorkloadError("scratchfs mount wrote no pid file")
        wait_mounted(self.mnt, None, self.log_path, self.name)

    @property
    def stats_path(self) -> Path:
        return self.base / "scratchfs-stats.json"

    def request_counts(self) -> dict[str, int] | None:
        """Ask the daemon (SIGUSR1) to dump its counters and wait for the fresh dump."""
        if self.pid is None:
            return None
        before = self._read_stats()
        seen = before.get("dumps", 0) if before else 0
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + STATS_TIMEOUT
        while time.monotonic() < deadline:
            doc = self._read_stats()
            if doc is not None and doc.get("dumps", 0) > seen:
                return dict(doc["requests"])
            time.sleep(0.005)
        raise WorkloadError(f"{self.name} did not dump its request counts within "
                            f"{STATS_TIMEOUT:.0f} s")

    def _read_stats(self) -> dict[str, Any] | None:
        try:
            doc: dict[str, Any] = json.loads(self.stats_path.read_text())
        except (FileNotFoundError, ValueError):
            return None
        return doc

    def stop(self) -> list[str]:
        problems: list[str] = []
        if mount_fstype(self.mnt) is not None:
            r = subprocess.run([sys.executable, "-m", "scratchfs", "umount", str(self.mnt)],
                               capture_output=True, text=True, check=False, timeout=120,
                               start_new_session=True)
            if r.returncode != 0:
                problems.append(f"scratchfs umount failed ({r.returncode}): {r.stderr.strip()}")
        problems += fuse_unmount(self.mnt)
        if self.pid is not None:
            problems += stop_pid(self.pid, None)
        self.pid = None
        return problems


def make_targets(names: list[str], block_sizes: list[int], scratchfs_args: list[str],
                 fuse_args: list[str], passthrough_args: list[str],
                 configs: dict[str, list[str]] | None = None) -> list[Target]:
    """The targets to run, in order: the base ones asked for, then one scratchfs per named
    configuration, then one scratchfs per block size of the sweep."""
    targets: list[Target] = []
    for n in names:
        if n == "tmpfs":
            targets.append(Target("tmpfs"))
        elif n == "zerofs":
            targets.append(PyfuseTarget("zerofs", module="tools.bench.zerofs",
                                        extra=list(fuse_args)))
        elif n == "passthrough":
            targets.append(PyfuseTarget("passthrough", module="tools.bench.passthrough",
                                        extra=[*fuse_args, *passthrough_args]))
        elif n == "gocryptfs":
            targets.append(GocryptfsTarget("gocryptfs"))
        elif n == "scratchfs":
            targets.append(ScratchfsTarget("scratchfs", extra=list(scratchfs_args)))
        elif n == "scratchfs-agent":
            # scratchfs exactly as the agent mounts its scratch space (agent/scratch.py).
            from agent.scratch import SCRATCHFS_OPTIONS

            targets.append(ScratchfsTarget("scratchfs-agent",
                                           extra=[*SCRATCHFS_OPTIONS, *scratchfs_args]))
        else:
            raise BenchError(f"unknown target {n!r}; choose from {', '.join(BASE_TARGETS)}")
    for cname, cargs in (configs or {}).items():
        targets.append(ScratchfsTarget(f"scratchfs-{cname}", extra=[*scratchfs_args, *cargs]))
    for bs in block_sizes:
        targets.append(ScratchfsTarget(f"scratchfs-bs{format_size(bs)}", block_size=bs,
                                       extra=list(scratchfs_args)))
    return targets


def format_size(n: int) -> str:
    """4096 -> '4K', 1048576 -> '1M'."""
    for unit, shift in (("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


# -- the run ----------------------------------------------------------------------------------
@dataclass
class RunConfig:
    """Everything a run needs (built from the command line)."""

    targets: list[Target]
    rounds: int
    sizes: Sizes
    workloads: list[str]
    fio_direct: bool
    tmpfs_size: str
    workdir_parent: Path | None


@dataclass
class Sample:
    """One target in one round: its numbers, or the error that stopped it."""

    round: int
    target: str
    metrics: dict[str, float]
    error: str | None = None
    cleanup_problems: list[str] = field(default_factory=list)


@dataclass
class RunResult:
    """All samples, plus what the run set up."""

    samples: list[Sample]
    tarball_files: int = 0
    tarball_bytes: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    interrupted: bool = False


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(f"signal {signum}")


def run(cfg: RunConfig, progress: Progress = print) -> RunResult:
    """Mount the tmpfs, run every round over every target, and always clean up."""
    if os.geteuid() != 0:
        raise BenchError("must run as root (mounts a tmpfs and FUSE filesystems, drops "
                         "caches); run it with sudo")
    for tool in ("fusermount3", "tar", "ls", "rm") + (("fio",) if "fio" in cfg.workloads
                                                        else ()):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not found; install it (make apt)")
    old_term = signal.signal(signal.SIGTERM, _raise_interrupted)
    # Workers orphaned by a killed tool come back to us, so cleanup can still end them.
    children.become_subreaper()
    top = Path(tempfile.mkdtemp(prefix="scratchfs-bench-", dir=cfg.workdir_parent))
    result = RunResult(samples=[])
    tmpfs_mounted = False
    active: list[Target] = []
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={cfg.tmpfs_size},mode=0700",
                        "scratchfs-bench", str(top)], check=True, capture_output=True,
                       timeout=60)
        tmpfs_mounted = True
        tarball = top / "tree.tar"
        if "tree" in cfg.workloads:
            result.tarball_files, result.tarball_bytes = workloads.build_tarball(
                tarball, cfg.sizes.tree_files)
            progress(f"tarball: {result.tarball_files} files, "
                     f"{result.tarball_bytes / 1e6:.1f} MB from the Python standard library")
        names = [t.name for t in cfg.targets]
        for rnd in range(cfg.rounds):
            # Rotate the order each round so no target always runs first (warm CPU, etc.).
            shift = rnd % len(cfg.targets)
            for target in cfg.targets[shift:] + cfg.targets[:shift]:
                base = top / f"r{rnd}-{names.index(target.name)}-{target.name}"
                sample = Sample(rnd, target.name, {})
                result.samples.append(sample)
                progress(f"round {rnd + 1}/{cfg.rounds} {target.name}: mounting")
                active.append(target)
                try:
                    target.start(base)
                    _run_workloads(cfg, target, tarball, sample, progress)
                except (WorkloadError, OSError, subprocess.SubprocessError) as e:
                    sample.error = f"{type(e).__name__}: {e}"
                    progress(f"round {rnd + 1}/{cfg.rounds} {target.name}: FAILED: "
                             f"{sample.error}")
                finally:
                    sample.cleanup_problems = target.stop()
                    active.remove(target)
                    for p in sample.cleanup_problems:
                        progress(f"round {rnd + 1}/{cfg.rounds} {target.name}: cleanup: {p}")
                shutil.rmtree(base, ignore_errors=True)
    except (KeyboardInterrupt, Interrupted):
        result.interrupted = True
        progress("interrupted: cleaning up")
    finally:
        # Tools first: a process still working inside a mount keeps it busy, and its unmount
        # would only be lazy.
        for p in _kill_stray_tools({t.pid for t in active}):
            progress(f"cleanup: {p}")
        for target in active:
            for p in target.stop():
                progress(f"cleanup {target.name}: {p}")
        if tmpfs_mounted:
            _unmount_tmpfs(top, progress)
        try:
            top.rmdir()
        except OSError as e:
            progress(f"cleanup: cannot remove {top}: {e}")
        signal.signal(signal.SIGTERM, old_term)
    return result


def _kill_stray_tools(daemons: set[int | None]) -> list[str]:
    """Kill every child of ours (and its descendants) that is not a target's daemon.

    `workloads.run_tool` kills its tool's tree however it ends; this covers the windows it
    cannot see: a Ctrl-C between fork and Popen returning (a child we never learned the pid
    of), and workers orphaned by a dead tool, which the subreaper flag (`run`) hands to us.
    Returns problems seen."""
    problems = []
    for pid in procs.children(os.getpid()):
        if pid in daemons:
            continue
        what = " ".join(procs.cmdline(pid))[:80]
        left = children.kill_tree(pid)
        problems.append(f"killed stray tool pid {pid} ({what})"
                        + (f"; still alive: {left}" if left else ""))
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
    return problems


def _unmount_tmpfs(top: Path, progress: Progress) -> None:
    # Anything still mounted below (should not happen) goes first, lazily.
    for mnt in sorted(mounts_under(top), key=len, reverse=True):
        if mnt == os.path.realpath(top):
            continue
        progress(f"cleanup: {mnt} was still mounted; unmounting lazily")
        subprocess.run(["umount", "-l", mnt], capture_output=True, check=False, timeout=60)
    r = subprocess.run(["umount", str(top)], capture_output=True, text=True, check=False,
                       timeout=60)
    if r.returncode != 0:
        progress(f"cleanup: umount {top} failed ({r.stderr.strip()}); unmounting lazily")
        subprocess.run(["umount", "-l", str(top)], capture_output=True, check=False, timeout=60)


def _run_workloads(cfg: RunConfig, target: Target, tarball: Path, sample: Sample,
                   progress: Progress) -> None:
    wd = target.workdir
    m = sample.metrics
    m.update(workloads.idle_rss(target.pid))
    label = f"round {sample.round + 1}/{cfg.rounds} {target.name}"
    counter = target.request_counts
    if "stream" in cfg.workloads:
        progress(f"{label}: streaming")
        m.update(workloads.stream(wd, cfg.sizes, target.pid, counter))
    if "fio" in cfg.workloads:
        progress(f"{label}: fio")
        m.update(workloads.fio(wd, cfg.sizes, direct=cfg.fio_direct, pid=target.pid))
    if "tree" in cfg.workloads:
        progress(f"{label}: small-file tree")
        m.update(workloads.tree(wd, tarball, target.pid, counter))
    if "files" in cfg.workloads:
        progress(f"{label}: {cfg.sizes.empty_files} empty files")
        m.update(workloads.files(wd, cfg.sizes.empty_files, target.pid, counter))
    if "scan" in cfg.workloads:
        progress(f"{label}: scan job (scale {cfg.sizes.scan_scale:g})")
        m.update(workloads.scan(wd, cfg.sizes, target.pid, counter))
    if target.pid is not None and not pid_alive(target.pid):
        raise WorkloadError(f"{target.name} daemon died during the workloads: "
                            f"{tail(target.log_path)}")
