"""The TPM keystore and clone detection, end to end on a real software TPM (swtpm).

What a thief with a copy of the disk gets (nothing usable), what a changed boot state does
(the agent refuses with exit 30), what two agents sharing one file-keystore identity do
(quarantine until an operator clears it), and the move of a file-keystore appliance into
the TPM without re-imaging.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent import state as statemod
from agent.exitcodes import EXIT_KEYSTORE, EXIT_PCR, EXIT_QUARANTINED, EXIT_TAMPERED
from agent.keystore.tpm import KEK_PRIV, TpmKeystore
from protocol import sealing
from tests.agent.conftest import AgentRun, run_agent_cli
from tools.demo import Platform, activate
from tools.swtpm import Swtpm

RUN_ARGS = ("--volume-size", "32M", "--poll-wait", "2", "--connect-timeout", "1",
            "--banner-timeout", "0.3")


def run_once(state_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_agent_cli("run", str(state_dir), "--once", *RUN_ARGS, *extra)


def queue_job(platform: Platform, name: str = "app1") -> str:
    return platform.cli("job", "add", name, "--targets", "127.0.0.1", "--ports", "1").stdout.decode().strip()


def job_state(platform: Platform, job_id: str) -> str:
    jobs = json.loads(platform.cli("job", "list", "--json").stdout)
    return str(next(j["state"] for j in jobs if j["id"] == job_id))


def appliance_row(platform: Platform, name: str = "app1") -> dict[str, object]:
    rows = json.loads(platform.cli("appliance", "list", "--json").stdout)
    return dict(next(r for r in rows if r["name"] == name))


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The error line; anything else on stderr must be the agent's own log lines (no
    libtss2 chatter, no traceback)."""
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("scanner-agent: "), proc.stderr
    assert all(" INFO " in ln or " WARNING " in ln for ln in lines[:-1]), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[-1]


def key_forms(state_dir: Path, tcti: str | None = None) -> dict[str, bytes]:
    """Every encoding of every private key the agent holds, read the way the agent does."""
    st = statemod.load_state(state_dir, tcti)
    try:
        pem = bytes(st.tls_key_pem())
        seal = bytes(st.seal_private())
        hybrid = statemod.load_hybrid_key(st.keystore)
    finally:
        st.forget()
    key = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    forms = {
        "tls pkcs8 pem": pem,
        "tls pkcs8 der": key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()),
        "tls sec1 der": key.private_bytes(serialization.Encoding.DER,
                                          serialization.PrivateFormat.TraditionalOpenSSL,
                                          serialization.NoEncryption()),
        "tls raw scalar": key.private_numbers().private_value.to_bytes(32, "big"),
        "seal raw": seal,
    }
    if hybrid is not None:  # the hybrid (ML-KEM-768 seed + X25519) sealing key, whole and halves
        forms["hybrid raw"] = bytes(hybrid)
        forms["hybrid mlkem seed"] = bytes(hybrid[: sealing.MLKEM_SEED_LEN])
        forms["hybrid x25519"] = bytes(hybrid[sealing.MLKEM_SEED_LEN :])
    if tcti is not None:
        ks = TpmKeystore.open(state_dir, json.loads((state_dir / "state.json").read_text())["keystore"], tcti)
        try:
            forms["tpm wrapping key"] = bytes(ks._key())
        finally:
            ks.close()
    return forms


def grep_state(state_dir: Path, forms: dict[str, bytes]) -> list[str]:
    """(file, form) for every key form found in any file under the state dir."""
    found = []
    needles = {**forms, "pem marker": b"PRIVATE KEY"}
    for path in sorted(state_dir.rglob("*")):
        if not path.is_file():
            continue
        data = path.read_bytes()
        found += [f"{path.name}: {name}" for name, needle in needles.items() if needle in data]
    return found


def test_tpm_keystore_full_run_leaves_no_private_key_on_disk(
    platform: Platform, swtpm: Swtpm, tmp_path: Path
) -> None:
    state = tmp_path / "appliance"
    activate(platform, "app1", state, swtpm.tcti)
    doc = json.loads((state / "state.json").read_text())
    assert doc["version"] == 2 and doc["keystore"]["kind"] == "tpm"
    assert not (state / statemod.KEY_PEM).exists() and not (state / statemod.SEAL_KEY).exists()
    job = queue_job(platform)
    proc = run_once(state)
    assert proc.returncode == 0, proc.stderr
    assert "event=session_opened boot_counter=1 keystore=tpm" in proc.stderr
    assert "keystore_insecure" not in proc.stderr
    assert job_state(platform, job) == "done"
    assert (state / "volume.img").stat().st_size >= 32 * 1024 * 1024
    forms = key_forms(state, swtpm.tcti)
    assert all(len(v) >= 32 for v in forms.values()) and "hybrid raw" in forms
    assert (state / "seal-key-hybrid.bin.tpm").exists() and not (state / statemod.SEAL_KEY_HYBRID).exists()
    assert grep_state(state, forms) == []
    # The platform saw the TPM-backed boot.
    row = appliance_row(platform)
    assert (row["keystore"], row["boot_counter"], row["quarantined"]) == ("tpm", 1, False)


def test_disk_copy_is_useless_and_the_real_appliance_keeps_working(
    platform: Platform, swtpm_factory: Callable[[str], Swtpm], tmp_path: Path
) -> None:
    real_tpm = swtpm_factory("tpm-real")
    state = tmp_path / "appliance"
    activate(platform, "app1", state, real_tpm.tcti)
    queue_job(platform)
    assert run_once(state).returncode == 0
    copy = tmp_path / "stolen"
    shutil.copytree(state, copy, symlinks=True)

    # (a) curl with the copied files: there is no key file to present, only TPM-wrapped blobs.
    url = f"{platform.url}/v1/volume-key"
    base = ["curl", "-sS", "--max-time", "10", "--cacert", str(copy / "ca.pem"), url]
    for key_file in ("client-key.pem.tpm", "seal-key.bin.tpm", KEK_PRIV, "client-cert.pem"):
        r = subprocess.run([*base, "--cert", str(copy / "client-cert.pem"), "--key", str(copy / key_file)],
                           capture_output=True, text=True, timeout=30, check=False)
        assert r.returncode != 0 and "sealed" not in r.stdout, (key_file, r.stdout)
        assert "key" in r.stderr.lower() or "certificate" in r.stderr.lower(), r.stderr
    r = subprocess.run(base, capture_output=True, text=True, timeout=30, check=False)  # no client cert
    assert json.loads(r.stdout)["reason"] == "client_certificate_required"

    # (b) the agent run from the copy on another machine's TPM: refused before any request.
    other_tpm = swtpm_factory("tpm-thief")
    proc = run_once(copy, "--tcti", other_tpm.tcti)
    assert proc.returncode == EXIT_KEYSTORE, proc.stderr
    line = one_line(proc)
    assert "sealed by another TPM" in line and "re-activate" in line
    # ... and with the copy's state.json pointed at the thief's TPM, too (binding never reached).
    doc = json.loads((copy / "state.json").read_text())
    doc["keystore"]["tcti"] = other_tpm.tcti
    (copy / "state.json").write_text(json.dumps(doc))
    assert run_once(copy).returncode == EXIT_KEYSTORE
    # ... and relabelled as a file keystore, there are no keys to find.
    doc["keystore"] = {"kind": "file"}
    (copy / "state.json").write_text(json.dumps(doc))
    proc = run_once(copy)
    assert proc.returncode == EXIT_TAMPERED and "missing client-key.pem" in one_line(proc)
    assert appliance_row(platform)["boot_counter"] == 1  # the copy never even opened a session

    # The real appliance keeps working.
    job = queue_job(platform)
    proc = run_once(state)
    assert proc.returncode == 0, proc.stderr
    assert job_state(platform, job) == "done"
    row = appliance_row(platform)
    assert (row["boot_counter"], row["quarantined"]) == (2, False)


def test_changed_pcr_refuses_the_next_boot(platform: Platform, swtpm: Swtpm, tmp_path: Path) -> None:
    state = tmp_path / "appliance"
    activate(platform, "app1", state, swtpm.tcti, "--tpm-pcrs", "7,16")
    assert json.loads((state / "state.json").read_text())["keystore"]["pcrs"] == [7, 16]
    statemod.load_state(state).forget()  # the boot state of activation unseals
    swtpm.extend_pcr(7)
    proc = run_once(state)
    assert proc.returncode == EXIT_PCR, proc.stderr
    line = one_line(proc)
    assert "PCR 7,16" in line and "measured boot state changed" in line and "re-activate" in line
    assert not (state / "volume.img").exists()  # refused before anything else happened


def test_activation_refuses_a_silent_file_keystore(platform: Platform, tmp_path: Path) -> None:
    if Path("/dev/tpmrm0").exists():
        pytest.skip("this machine has a TPM: the default is the tpm keystore")
    code = platform.cli("appliance", "add", "app1").stdout.decode().strip()
    args = ("activate", str(tmp_path / "s"), "--platform", platform.url, "--ca", str(platform.ca),
            "--code", code)
    proc = run_agent_cli(*args)
    assert proc.returncode == EXIT_KEYSTORE
    assert "no TPM found" in one_line(proc) and "--keystore file" in one_line(proc)
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").iterdir())
    proc = run_agent_cli(*args, "--keystore", "file", "--tpm-pcrs", "7")
    assert proc.returncode == EXIT_KEYSTORE and "--tpm-pcrs needs the tpm keystore" in one_line(proc)
    # The code was not burnt by the refusals.
    assert run_agent_cli(*args, "--keystore", "file").returncode == 0


def test_two_agents_sharing_a_file_identity_are_quarantined_until_cleared(
    platform: Platform, agent_factory: Callable[..., AgentRun], tmp_path: Path
) -> None:
    state = tmp_path / "appliance"
    activate(platform, "app1", state)  # file keystore
    # One identity, two machines: the second agent runs from a copy of the state dir (the
    # agents' run/ mount points cannot be shared) whose boot-counter file we keep as one file,
    # as it is when the state dir itself is shared.
    clone = tmp_path / "clone"
    shutil.copytree(state, clone)
    first = agent_factory(state)
    assert first.wait_log("event=session_opened boot_counter=1"), first.stderr()
    assert "event=keystore_insecure keystore=file" in first.stderr()
    shutil.copyfile(state / "boot-counter", clone / "boot-counter")
    second = agent_factory(clone)
    assert second.wait_log("event=session_opened boot_counter=2"), second.stderr()
    # The first agent's next poll carries the superseded session: both are stopped.
    assert first.proc.wait(timeout=60) == EXIT_QUARANTINED, first.stderr()
    assert second.proc.wait(timeout=60) == EXIT_QUARANTINED, second.stderr()
    assert "quarantined" in first.stderr().splitlines()[-1]
    row = appliance_row(platform)
    assert row["quarantined"] is True and "superseded session (boot 1)" in str(row["quarantine_reason"])
    events = platform.cli("appliance", "list").stdout.decode()
    [row] = [ln for ln in events.splitlines() if ln.startswith("app1 ")]
    assert row.split()[:3] == ["app1", "active", "quarantined"] and " file " in row, events
    shutil.copyfile(clone / "boot-counter", state / "boot-counter")
    job = queue_job(platform)
    assert run_once(state).returncode == EXIT_QUARANTINED  # still quarantined: no key, no job
    assert job_state(platform, job) == "queued"

    # The operator stops the clone and clears the quarantine: the appliance works again.
    out = platform.cli("appliance", "clear", "app1")
    assert b"released from quarantine" in out.stdout
    proc = run_once(state)
    assert proc.returncode == 0, proc.stderr
    assert job_state(platform, job) == "done"
    assert appliance_row(platform)["quarantined"] is False


def test_file_appliance_keeps_booting_then_migrates_into_the_tpm(
    platform: Platform, swtpm: Swtpm, tmp_path: Path
) -> None:
    state = tmp_path / "appliance"
    activate(platform, "app1", state)  # file keystore: an existing appliance
    queue_job(platform)
    proc = run_once(state)
    assert proc.returncode == 0, proc.stderr
    assert "event=keystore_insecure keystore=file" in proc.stderr
    before = key_forms(state)
    old_cert = (state / "client-cert.pem").read_bytes()
    old_serial = appliance_row(platform)["cert_serial"]
    pubkey = platform.cli("appliance", "pubkey", "app1").stdout

    before_copy = tmp_path / "before-migration"
    shutil.copytree(state, before_copy, ignore=shutil.ignore_patterns("run", "volume.img"))
    proc = run_agent_cli("migrate-keystore", str(state), "--tcti", swtpm.tcti)
    assert proc.returncode == 0, proc.stderr
    assert "now keeps its keys in the TPM" in proc.stdout
    doc = json.loads((state / "state.json").read_text())
    assert doc["keystore"]["kind"] == "tpm" and doc["appliance"] == "app1"
    for gone in (statemod.KEY_PEM, statemod.SEAL_KEY, "boot-counter", ".migrate", "volume-share-1"):
        assert not (state / gone).exists(), gone
    assert (state / "volume-share-1.tpm").exists()  # the appliance's volume-key share moved too
    after = key_forms(state, swtpm.tcti)
    assert after["seal raw"] == before["seal raw"]  # re-wrapped, not regenerated
    assert after["hybrid raw"] == before["hybrid raw"]  # the hybrid sealing key too
    assert after["tls raw scalar"] != before["tls raw scalar"]  # a new TLS key...
    assert (state / "client-cert.pem").read_bytes() != old_cert  # ...with a new certificate
    row = appliance_row(platform)
    assert row["cert_serial"] != old_serial
    crl = x509.load_pem_x509_crl(platform.cli("crl").stdout)
    assert crl.get_revoked_certificate_by_serial_number(int(str(old_serial), 16)) is not None
    assert platform.cli("appliance", "pubkey", "app1").stdout == pubkey  # sealed credentials still open
    assert grep_state(state, {**before, **after}) == []

    job = queue_job(platform)
    proc = run_once(state)
    assert proc.returncode == 0, proc.stderr
    assert "keystore=tpm" in proc.stderr and "keystore_insecure" not in proc.stderr
    assert job_state(platform, job) == "done"  # same volume, same volume key, new identity
    row = appliance_row(platform)  # the TPM counter continued above the file counter's boots
    assert (row["keystore"], row["boot_counter"], row["quarantined"]) == ("tpm", 3, False)
    # A crash after the platform renewed the certificate but before the swap: the old state
    # plus a complete .migrate dir. Running the command again finishes it, offline.
    staged = before_copy / ".migrate"
    staged.mkdir(mode=0o700)
    for name in ("state.json", "client-cert.pem", "binding.mac", "client-key.pem.tpm", "seal-key.bin.tpm",
                 "seal-key-hybrid.bin.tpm", "tpm-kek.pub", "tpm-kek.priv"):
        shutil.copy2(state / name, staged / name)
    (staged / "state.json").replace(before_copy / "state.json")  # and it crashed mid-swap, even
    proc = run_agent_cli("migrate-keystore", str(before_copy), "--tcti", swtpm.tcti)
    assert proc.returncode == 0 and "interrupted migration finished" in proc.stdout, proc.stderr
    assert not staged.exists() and not (before_copy / statemod.KEY_PEM).exists()
    assert key_forms(before_copy, swtpm.tcti)["tls raw scalar"] == after["tls raw scalar"]
    # Migrating twice is refused in one line.
    proc = run_agent_cli("migrate-keystore", str(state), "--tcti", swtpm.tcti)
    assert proc.returncode == EXIT_KEYSTORE and "already uses the tpm keystore" in one_line(proc)
