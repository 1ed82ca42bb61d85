"""The agent's systemd unit: accepted by systemd's own checker, hardened as documented.

PID 1 here is not systemd, so the unit cannot be started; `systemd-analyze verify` and the
offline security audit are what systemd itself offers without a running manager.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent import exitcodes

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "systemd" / "scanner-agent.service"
INSTALLED_EXEC = "/opt/scanner-agent/.venv/bin/scanner-agent"
MAX_EXPOSURE = 3.0

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")


def _settings(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "[")):
            continue
        key, _, value = line.partition("=")
        found.setdefault(key, []).append(value)
    return found


@pytest.fixture
def unit_here(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's scanner-agent (verify checks it exists)."""
    agent_bin = Path(sys.executable).parent / "scanner-agent"
    assert agent_bin.exists(), agent_bin
    text = UNIT.read_text()
    assert INSTALLED_EXEC in text
    out = tmp_path / UNIT.name
    out.write_text(text.replace(INSTALLED_EXEC, str(agent_bin)))
    return out


def test_unit_passes_systemd_analyze_verify(unit_here: Path) -> None:
    proc = subprocess.run(["systemd-analyze", "verify", str(unit_here)], capture_output=True, text=True, timeout=60)
    # verify prints warnings for unknown or misplaced keys but may still exit 0: any line
    # that names our unit is a finding.
    findings = [line for line in (proc.stdout + proc.stderr).splitlines() if unit_here.name in line]
    assert proc.returncode == 0 and not findings, proc.stdout + proc.stderr


def test_offline_security_exposure_is_ok(unit_here: Path) -> None:
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit_here)],
        capture_output=True, text=True, timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", proc.stdout + proc.stderr)
    assert match, proc.stdout + proc.stderr
    score, verdict = float(match.group(1)), match.group(2)
    print(f"systemd-analyze security --offline=true: {score} {verdict}")
    assert score <= MAX_EXPOSURE and verdict == "OK", proc.stdout


def test_unit_is_client_only_and_keeps_keys_off_disk() -> None:
    settings = _settings(UNIT.read_text())
    # No socket activation: the agent never listens.
    assert "ListenStream" not in settings and "Sockets" not in settings
    for key, value in {
        "LimitCORE": "0",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "KeyringMode": "private",
    }.items():
        assert settings.get(key) == [value], key
    families = settings["RestrictAddressFamilies"][0].split()
    assert set(families) <= {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    assert settings["StandardOutput"] == ["journal"]


def test_restart_policy_matches_the_agents_exit_codes() -> None:
    settings = _settings(UNIT.read_text())
    assert settings["Restart"] == ["on-failure"]
    prevented = {int(code) for code in settings["RestartPreventExitStatus"][0].split()}
    # A restart cannot fix these: the operator must act (docs/agent.md exit codes).
    assert {
        exitcodes.EXIT_USAGE, exitcodes.EXIT_STATE, exitcodes.EXIT_TAMPERED,
        exitcodes.EXIT_DEACTIVATED, exitcodes.EXIT_PCR,
    } <= prevented
    # ...and it must fix the transient ones.
    assert not {exitcodes.EXIT_PLATFORM, exitcodes.EXIT_TIME, exitcodes.EXIT_SCRATCH} & prevented


def test_exec_start_is_the_real_command_line(unit_here: Path) -> None:
    exec_start = _settings(unit_here.read_text())["ExecStart"][0].split()
    proc = subprocess.run([exec_start[0], exec_start[1], "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert exec_start[1] == "run" and exec_start[2] == "/var/lib/scanner-agent"
