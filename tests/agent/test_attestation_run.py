"""Attestation through the agent's own commands: activation enrolls the swtpm (EK certificate
from a local CA the platform trusts), every boot carries a quote and a certified counter,
and a changed PCR is refused by the platform (exit 30) until the operator accepts it."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import EXIT_PCR
from protocol import api
from tests.agent.conftest import run_agent_cli
from tools.demo import Platform, activate
from tools.swtpm import EkCa, Swtpm, start_swtpm

RUN_ARGS = ("--volume-size", "32M", "--poll-wait", "2", "--connect-timeout", "1", "--banner-timeout", "0.3")


@pytest.fixture
def tpm(tmp_path: Path) -> Iterator[tuple[Swtpm, EkCa]]:
    ca = EkCa(tmp_path / "ek-ca")
    t = start_swtpm(tmp_path / "tpm", ek_ca=ca)
    yield t, ca
    t.stop()


def run_once(platform: Platform, state: Path) -> subprocess.CompletedProcess[str]:
    platform.cli("job", "add", "app1", "--targets", "127.0.0.1", "--ports", "1")
    return run_agent_cli("run", str(state), "--once", *RUN_ARGS)


def row(platform: Platform) -> dict[str, object]:
    return dict(next(r for r in json.loads(platform.cli("appliance", "list", "--json").stdout) if r["name"] == "app1"))


def test_activation_enrolls_and_boots_are_attested(
    platform: Platform, tpm: tuple[Swtpm, EkCa], tmp_path: Path
) -> None:
    swtpm, ca = tpm
    platform.cli("ek-ca", "set", str(ca.bundle))
    state = tmp_path / "appliance"
    activate(platform, "app1", state, swtpm.tcti)
    assert (state / "tpm-ak.pub").exists() and (state / "tpm-ak.priv").exists()
    assert row(platform)["attestation"] == "enrolled"
    proc = run_once(platform, state)
    assert proc.returncode == 0, proc.stderr
    assert "attested=yes" in proc.stderr
    r = row(platform)
    assert r["attestation"] == "attested" and r["last_verified_boot"] is not None and not r["quarantined"]
    assert "tpm (attested)" in platform.cli("appliance", "list").stdout.decode()
    # A changed boot state (PCR 0: firmware) is seen by the platform, not only by the TPM's policy.
    swtpm.extend_pcr(0)
    proc = run_once(platform, state)
    assert proc.returncode == EXIT_PCR, proc.stderr
    assert "recorded baseline" in proc.stderr.strip().splitlines()[-1]
    assert row(platform)["pcr_state"] == "mismatch"
    shown = platform.cli("appliance", "baseline", "app1").stdout.decode()
    assert "(changed)" in shown
    platform.cli("appliance", "baseline", "app1", "--accept")
    proc = run_once(platform, state)
    assert proc.returncode == 0, proc.stderr


def test_tpm_without_ek_certificate_runs_unattested(platform: Platform, swtpm: Swtpm, tmp_path: Path) -> None:
    state = tmp_path / "appliance"
    code = platform.cli("appliance", "add", "app1").stdout.decode().strip()
    proc = run_agent_cli(
        "activate", str(state), "--platform", platform.url, "--ca", str(platform.ca), "--code", "-",
        "--tcti", swtpm.tcti, input_=code.encode() + b"\n",
    )  # fmt: skip
    assert proc.returncode == 0 and "(unattested: this TPM has no EK certificate" in proc.stdout, proc.stderr
    proc = run_once(platform, state)
    assert proc.returncode == 0 and "attested=no" in proc.stderr, proc.stderr
    assert row(platform)["attestation"] == "claimed"


def test_unseal_refused_on_changed_pcr_is_reported_to_the_platform(
    platform: Platform, tpm: tuple[Swtpm, EkCa], tmp_path: Path
) -> None:
    """Keys sealed to PCR 8 (GRUB's commands, the kernel command line): a changed PCR 8 makes
    the TPM refuse to unseal, so there is no TLS key and no session; the agent still reports
    the boot with an AK quote and the platform records the mismatch as a session's would."""
    swtpm, ca = tpm
    platform.cli("ek-ca", "set", str(ca.bundle))
    state = tmp_path / "appliance"
    activate(platform, "app1", state, swtpm.tcti, "--tpm-pcrs", "8")
    assert run_once(platform, state).returncode == 0
    swtpm.extend_pcr(8)
    proc = run_once(platform, state)
    assert proc.returncode == EXIT_PCR, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "TPM refuses to unseal" in last and f"(reported to the platform: {api.VERDICT_PCR_MISMATCH})" in last, last
    assert f"event=pcr_mismatch_reported verdict={api.VERDICT_PCR_MISMATCH}" in proc.stderr
    assert "Traceback" not in proc.stderr
    r = row(platform)
    assert r["pcr_state"] == "mismatch" and r["attestation"] == "attested", r
    shown = platform.cli("appliance", "baseline", "app1").stdout.decode()
    assert "(changed)" in shown  # the reported PCR values, for the operator to judge
    served = (platform.state / "serve.log").read_text()
    assert "event=pcr_mismatch appliance=app1" in served and "source=boot_report" in served
    assert served.count("session opened appliance=app1") == 1  # the report opened no session

    # A platform that cannot be reached changes nothing but the line: still exit 30.
    platform.stop()
    proc = run_agent_cli("run", str(state), "--once", *RUN_ARGS)
    assert proc.returncode == EXIT_PCR, proc.stderr
    assert "(not reported to the platform: " in proc.stderr.strip().splitlines()[-1], proc.stderr


def test_unenrolled_tpm_mismatch_exits_30_without_a_report(platform: Platform, swtpm: Swtpm, tmp_path: Path) -> None:
    state = tmp_path / "appliance"
    activate(platform, "app1", state, swtpm.tcti, "--tpm-pcrs", "8")
    swtpm.extend_pcr(8)
    proc = run_once(platform, state)
    assert proc.returncode == EXIT_PCR, proc.stderr
    assert "event=pcr_mismatch_not_reported reason=not_enrolled" in proc.stderr
