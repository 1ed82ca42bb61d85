"""fio with sha256 verification on the mount: sequential, random, and concurrent unaligned jobs."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.fs.conftest import Target

JOBS = {
    "seq": ["--rw=write", "--bs=1M", "--size=64M"],
    "rand4k": ["--rw=randwrite", "--bs=4k", "--size=24M"],
    # Unaligned sizes and two jobs at once (each on its own file).
    "rand-mixed": ["--rw=randwrite", "--bsrange=512-96k", "--size=16M", "--numjobs=2"],
}


@pytest.mark.parametrize("job", list(JOBS))
def test_fio_verify(fs1: Target, job: str) -> None:
    fio = shutil.which("fio")
    assert fio, "fio is missing (Debian package fio, in the Makefile's apt list)"
    cmd = [
        fio, f"--name={job}", f"--directory={fs1.root}", "--ioengine=psync",
        "--verify=sha256", "--do_verify=1", "--verify_fatal=1", "--verify_dump=0",
        "--randrepeat=1", "--group_reporting=0", "--output-format=json", *JOBS[job],
    ]
    # cwd: fio drops its verify state files (*.state) in the working directory.
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=False, cwd=fs1.root.parent)
    assert proc.returncode == 0, f"fio failed: {proc.stderr.strip()[-2000:]}"
    assert "verify" not in proc.stderr.lower(), proc.stderr[-2000:]
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    jobs = report["jobs"]
    assert jobs
    for j in jobs:
        assert j["error"] == 0, j
        # Everything written was read back and checked.
        assert j["write"]["io_bytes"] > 0
        assert j["read"]["io_bytes"] == j["write"]["io_bytes"], j["jobname"]
