"""stress-ng's filesystem class with --verify on the mount, in every configuration (issue 23).

All the class's stressors run at once, one instance each, for a few seconds: they race each
other on one mount the way a scan job's tools do. stress-ng exits 0 only if no stressor
failed or found a verification error; the daemon's log must stay free of errors (checked at
unmount). Stressors for kernel features a FUSE mount does not have skip themselves (fiemap,
verity); binderfs is excluded because it needs a kernel filesystem this machine lacks and
reports that as a resource failure.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.fs.conftest import Target

SECONDS_PER_STRESSOR = 3


@pytest.mark.slow
def test_stress_ng_filesystem_class_verifies(fs: Target) -> None:
    stress_ng = shutil.which("stress-ng")
    assert stress_ng, "stress-ng is missing (Debian package stress-ng, in the Makefile's apt list)"
    work = fs.root / "stress"
    work.mkdir()
    cmd = [
        stress_ng, "--class", "filesystem", "--all", "1", "--exclude", "binderfs",
        "--timeout", f"{SECONDS_PER_STRESSOR}s", "--verify", "--temp-path", str(work),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=False, cwd=work)
    failures = [ln for ln in proc.stderr.splitlines() + proc.stdout.splitlines() if " fail: " in ln]
    assert proc.returncode == 0 and not failures, (
        f"stress-ng exit {proc.returncode}:\n" + "\n".join(failures or proc.stderr.splitlines()[-30:])
    )
