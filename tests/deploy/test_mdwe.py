"""The whole system runs with W^X enforced, as the unit's MemoryDenyWriteExecute=yes demands.

systemd enforces MemoryDenyWriteExecute with a seccomp filter that PID 1 here cannot install
for us; the kernel's own PR_SET_MDWE (Linux 6.3+) gives the same refusal (no mapping that is
both writable and executable), inherited by every child across fork and exec. We switch it
on at interpreter start through sitecustomize and run the demo: platform, agent, TPM keystore
(tpm2-pytss/cffi), libcryptsetup through ctypes callbacks, the volume server and scratchfs.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1

SITECUSTOMIZE = f"""
import ctypes, mmap
if ctypes.CDLL(None, use_errno=True).prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:
    raise SystemExit("PR_SET_MDWE failed")
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except PermissionError:
    pass
else:
    raise SystemExit("PR_SET_MDWE is set but a W+X mapping was still allowed")
"""


def _mdwe_supported() -> bool:
    # Probe in a child: the flag cannot be cleared once set.
    probe = f"import ctypes,sys; sys.exit(ctypes.CDLL(None).prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0))"
    return subprocess.run([sys.executable, "-c", probe], timeout=30).returncode == 0


@pytest.mark.skipif(not hasattr(ctypes, "CDLL") or not _mdwe_supported(), reason="kernel without PR_SET_MDWE (< 6.3)")
def test_demo_runs_with_write_xor_execute(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{ROOT}")
    proc = subprocess.run(
        [sys.executable, "-m", "tools.demo"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
