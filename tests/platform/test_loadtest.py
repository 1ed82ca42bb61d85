"""Smoke runs of the load generator (the full fleet runs are `make loadtest`): a small fleet
on SQLite, and on two PostgreSQL nodes with two workers per appliance (so that two nodes
race for every job) beside a slowloris attack. The tool itself checks exactly-once jobs,
intact results, no 5xx and the boot storm; it exits 0 only if all held."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

LOADTEST = [sys.executable, "-m", "tools.loadtest"]


@pytest.mark.parametrize(
    "extra",
    [
        ["--backend", "sqlite"],
        ["--backend", "postgresql", "--nodes", "2", "--pollers", "2", "--slowloris", "16"],
    ],
    ids=["sqlite-1-node", "postgresql-2-nodes-slowloris"],
)
def test_loadtest_smoke(tmp_path: Path, extra: list[str]) -> None:
    report_path = tmp_path / "report.json"
    proc = subprocess.run(
        [*LOADTEST, "--appliances", "12", "--duration", "2", "--poll-wait", "5", "--json", str(report_path), *extra],
        capture_output=True,
        timeout=240,
        check=False,
    )
    out = proc.stdout.decode()
    assert proc.returncode == 0, out + proc.stderr.decode()[-2000:]
    report = json.loads(report_path.read_text())
    assert report["jobs_queued"] == 24 and report["jobs_completed"] == 24
    assert report["jobs_lost"] == report["jobs_handed_out_twice"] == report["results_bad"] == 0
    assert report["server_errors_5xx"] == 0
    assert report["boot_storm"]["volume_keys_unsealed"] == 12
    for endpoint in ("activate", "time", "volume-key", "progress", "result"):
        assert report["endpoints"][endpoint]["count"] >= 12, endpoint
    if "--slowloris" in extra:
        assert report["endpoints"]["probe: time (fresh TLS)"]["count"] >= 1


def test_loadtest_usage_errors_are_one_line() -> None:
    proc = subprocess.run([*LOADTEST, "--nodes", "2"], capture_output=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert len(proc.stderr.decode().strip().splitlines()) == 1
