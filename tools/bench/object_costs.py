"""What each kind of object really costs the scratchfs daemon, against what the budget charges.

`python -m tools.bench.object_costs [--budget 24M] [KIND ...]` (as root; minutes per kind).

For each kind, a fresh `--allow-other` mount with `--memory-budget BUDGET --owner-reserve 0`;
`nobody` makes objects of that kind until the budget refuses one. Real cost per object is the
daemon's VmRSS growth divided by the count; the charge per object is the budget used at the
first refusal (its `event=limit_reached` log line) divided by the count. The constants in
scratchfs/limits.py were calibrated with this (docs/threat-model.md, "Memory").
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRATCHFS = [sys.executable, "-m", "scratchfs"]
NOBODY = 65534

# Each snippet makes objects until an OSError; `n` counts them. Run as nobody in the kind's directory.
KINDS = {
    "file_short": 'os.close(os.open(f"f{n}", os.O_CREAT | os.O_WRONLY, 0o644))',
    "file_255": 'os.close(os.open(f"{n}".ljust(255, "f"), os.O_CREAT | os.O_WRONLY, 0o644))',
    # opened with O_TRUNC once: the content engine and lock exist from then on, as after a read or write
    "file_truncated": 'os.close(os.open(f"f{n}", os.O_CREAT | os.O_WRONLY, 0o644)); '
    'os.close(os.open(f"f{n}", os.O_WRONLY | os.O_TRUNC))',
    "file_written": 'fd = os.open(f"f{n}", os.O_CREAT | os.O_WRONLY, 0o644); os.write(fd, b"x"); os.close(fd)',
    "link_short": 'os.link("target", f"l{n}")',
    "link_255": 'os.link("target", f"{n}".ljust(255, "l"))',
    "symlink_short": 'os.symlink("t" * 64, f"s{n}")',
    "symlink_255": 'os.symlink("t" * 64, f"{n}".ljust(255, "s"))',
    "dir_short": 'os.mkdir(f"d{n}")',
    "dir_255": 'os.mkdir(f"{n}".ljust(255, "d"))',
    "dir_with_file": 'os.mkdir(f"d{n}"); os.close(os.open(f"d{n}/f", os.O_CREAT | os.O_WRONLY, 0o644))',
    "xattr_short": 'os.setxattr(f"x{n // 100}", f"user.{n % 100}", b"v" * 16)',
    "xattr_255": 'os.setxattr(f"x{n // 100}", f"user.{n % 100}".ljust(255, "k"), b"v" * 16)',
    "handle": 'fds.append(os.open("target", os.O_RDONLY))',
}

CHILD = r"""
import os, resource, sys
os.chdir(sys.argv[1])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
os.setgroups([])
os.setresgid({uid}, {uid}, {uid})
os.setresuid({uid}, {uid}, {uid})
fds = []
n = 0
if {xattrs}:
    for i in range(200000):
        try:
            os.close(os.open(f"x{{i}}", os.O_CREAT | os.O_WRONLY, 0o644))
        except OSError:
            break
    print("ready", flush=True)
    sys.stdin.readline()
try:
    while True:
        {make}
        n += 1
except OSError as e:
    print(n, e.errno, flush=True)
sys.stdin.read()
"""


def rss(pid: int) -> int:
    """The daemon's VmRSS in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def measure(kind: str, budget: str, work: Path) -> tuple[int, float, float]:
    """(objects, real bytes per object, charged bytes per object) for one kind."""
    backing, mnt, log, pid_file = work / "b", work / "m", work / "daemon.log", work / "pid"
    backing.mkdir()
    mnt.mkdir()
    mount_args = ["mount", str(backing), str(mnt), "--allow-other", "--memory-budget", budget]
    # xattr kinds: 2,000 files to hang them on, made until the inode limit, whose refusal logs the budget used
    inodes = "2002" if kind.startswith("xattr") else "100000000"
    mount_args += ["--owner-reserve", "0", "--max-inodes", inodes, "--log-file", str(log)]
    subprocess.run([*SCRATCHFS, *mount_args, "--pid-file", str(pid_file)], check=True)
    pid = int(pid_file.read_text())
    child = None
    try:
        os.chmod(mnt, 0o777)
        (mnt / "target").write_bytes(b"")
        os.chmod(mnt / "target", 0o666)
        xattrs = kind.startswith("xattr")
        script = CHILD.format(uid=NOBODY, xattrs=xattrs, make=KINDS[kind])
        child = subprocess.Popen(
            [sys.executable, "-I", "-c", script, str(mnt)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert child.stdout is not None and child.stdin is not None
        if xattrs:
            assert child.stdout.readline().strip() == "ready"
            time.sleep(0.5)
            idle_rss, idle_used = rss(pid), _budget_used(log)
            child.stdin.write("go\n")
            child.stdin.flush()
        else:
            time.sleep(0.5)
            idle_rss, idle_used = rss(pid), 0
        count = int(child.stdout.readline().split()[0])
        time.sleep(0.5)
        grew = rss(pid) - idle_rss
        used = _budget_used(log) - idle_used
        return count, grew / count, used / count
    finally:
        if child is not None:
            if child.stdin is not None:
                child.stdin.close()  # the child exits at end of input, closing its handles
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        subprocess.run([*SCRATCHFS, "umount", str(mnt)], check=False, timeout=120)


def _budget_used(log: Path) -> int:
    """Budget used at the last logged refusal (0 if none yet)."""
    found = re.findall(r"event=limit_reached what=\w+ budget_used=(\d+)", log.read_text())
    return int(found[-1]) if found else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", default="24M", help="memory budget of each mount (default 24M)")
    parser.add_argument("kinds", nargs="*", choices=[*KINDS, []], help="kinds to measure (default: all)")
    args = parser.parse_args()
    print(f"{'kind':15s} {'objects':>8s} {'real B':>8s} {'charged B':>9s} {'charged/real':>12s}")
    for kind in args.kinds or KINDS:
        with tempfile.TemporaryDirectory(prefix="scratchfs-costs-") as tmp:
            count, real, charged = measure(kind, args.budget, Path(tmp))
        print(f"{kind:15s} {count:8d} {real:8.0f} {charged:9.0f} {charged / real:12.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
