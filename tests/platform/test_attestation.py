"""Remote attestation against the real platform (real TLS, SQLite and PostgreSQL) with a real
software TPM (swtpm, manufactured with an EK certificate from a local CA the platform trusts).

The issue's reproductions: a key holder without a TPM claiming any boot counter (the curl
reproduction, here through the Python HTTP client), a copy of the swtpm state booting as the
appliance; and every forgery the issue names (forged counter, replayed quote, quote over
other PCRs, keys not certified as TPM-resident), each refused with its documented reason.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from agent.attest import Attestor, Evidence
from agent.attest_platform import boot_evidence, enroll_keys
from agent.keystore.tpm import TpmKeystore
from protocol import api, client, sealing
from tests.platform.conftest import HOSTNAME, Platform, run_cli, tls_client
from tools.platform import db, state
from tools.platform.boot_nonce import BootNonces
from tools.swtpm import EkCa, Swtpm, copy_state, start_swtpm


@pytest.fixture(scope="module")
def ek_ca(tmp_path_factory: pytest.TempPathFactory) -> EkCa:
    return EkCa(tmp_path_factory.mktemp("ek-ca"))


@pytest.fixture
def tpms(tmp_path: Path) -> Iterator[list[Swtpm]]:
    """swtpm instances the test starts; stopped by PID at teardown."""
    started: list[Swtpm] = []
    yield started
    for t in started:
        t.stop()


@dataclass
class TpmAppliance:
    """An activated appliance whose keystore is in a swtpm."""

    name: str
    client: client.PlatformClient
    cert_pem: bytes
    x25519_public: bytes
    keystore: TpmKeystore
    attestor: Attestor


@pytest.fixture
async def keystores() -> AsyncIterator[list[TpmKeystore]]:
    opened: list[TpmKeystore] = []
    yield opened
    for ks in opened:
        ks.close()


async def activate_tpm(
    platform: Platform, name: str, tpm: Swtpm, root: Path, keystores: list[TpmKeystore]
) -> TpmAppliance:
    """Activate like the agent does (no session yet) with its keystore in *tpm*."""
    code = platform.add_appliance(name)
    key_pem, csr = client.new_client_key_and_csr(name)
    _xpriv, xpub = sealing.generate_keypair()
    res = await platform.anon_client().activate(code, csr, xpub)
    c = client.PlatformClient(platform.url, tls_client(platform.ca_pem, res.certificate_pem, key_pem), timeout=20.0)
    root.mkdir(mode=0o700)
    ks = TpmKeystore.create(root, tpm.tcti, ())
    ks.persist()
    keystores.append(ks)
    return TpmAppliance(name, c, res.certificate_pem, xpub, ks, Attestor(ks))


async def enroll(platform: Platform, a: TpmAppliance) -> str:
    return await enroll_keys(a.client, a.attestor, a.cert_pem, a.x25519_public, b"")


async def boot(a: TpmAppliance, claimed: int = 1) -> str:
    counter, evidence = await boot_evidence(a.client, a.attestor)
    return await a.client.open_session(claimed or counter, "tpm", evidence)


def listing(platform: Platform, name: str) -> dict[str, object]:
    out = run_cli("appliance", "list", "--json", state_dir=platform.paths.root)
    return dict(next(r for r in json.loads(out.stdout) if r["name"] == name))


def events(platform: Platform, kind: str) -> list[str]:
    return [e[4] for e in platform.storage.events(kind)]


async def refused(call: object, reason: str) -> client.PlatformError:
    with pytest.raises(client.PlatformError) as ei:
        await call  # type: ignore[misc]
    assert ei.value.reason == reason, ei.value
    return ei.value


@pytest.fixture
def trusting(platform: Platform, ek_ca: EkCa, tpms: list[Swtpm], tmp_path: Path) -> Platform:
    """The platform trusting the local "manufacturer" CA (as 'ek-ca set' does)."""
    tpms.append(start_swtpm(tmp_path / "first-tpm", ek_ca=ek_ca))  # creates the CA on first use
    assert run_cli("ek-ca", "set", str(ek_ca.bundle), state_dir=platform.paths.root).returncode == 0
    return platform


async def test_claimed_counters_cannot_lock_the_real_appliance_out(platform: Platform) -> None:
    """The curl reproduction: a file-keystore key holder claims "tpm" and counter 2^63-1."""
    a = await platform.activate("f1")  # boot 1, file keystore
    copy = client.PlatformClient(platform.url, tls_client(platform.ca_pem, a.cert_pem, a.key_pem), timeout=20.0)
    await copy.open_session(7, "tpm")  # accepted, but only as a claim
    assert listing(platform, "f1")["attestation"] == "claimed"
    out = run_cli("appliance", "list", state_dir=platform.paths.root).stdout.decode()
    assert "tpm (claimed)" in out
    with pytest.raises(client.QuarantinedError):
        await copy.open_session(api.MAX_BOOT_COUNTER, "tpm")
    assert "jumps from 7" in events(platform, db.EVENT_CLONE_SUSPECTED)[-1]
    # The operator keeps the session of boot 7 (the legitimate one here): the real appliance's
    # next boot is accepted, not refused as "not above 2^63-1" after every clear.
    sessions = run_cli("appliance", "sessions", "f1", state_dir=platform.paths.root).stdout.decode()
    keep = next(ln.split()[0] for ln in sessions.splitlines() if " 7 " in ln)
    proc = run_cli("appliance", "clear", "f1", "--keep", keep, state_dir=platform.paths.root)
    assert proc.returncode == 0 and b"boot counter 7" in proc.stdout, proc.stderr
    await a.client.open_session(8, "file")
    assert len(await a.client.keyslot_passphrase()) > 32
    assert listing(platform, "f1")["attestation"] == "none"
    assert "file (unattested)" in run_cli("appliance", "list", state_dir=platform.paths.root).stdout.decode()


async def test_enrolled_appliance_boots_on_tpm_evidence_only(
    trusting: Platform, ek_ca: EkCa, tpms: list[Swtpm], keystores: list[TpmKeystore], tmp_path: Path
) -> None:
    platform = trusting
    tpms.append(tpm := start_swtpm(tmp_path / "tpm", ek_ca=ek_ca))
    a = await activate_tpm(platform, "t1", tpm, tmp_path / "t1", keystores)
    assert await enroll(platform, a) == "attested"
    assert listing(platform, "t1")["attestation"] == "enrolled"
    # The body's counter is ignored: the session's counter is the TPM-certified one.
    await boot(a, claimed=api.MAX_BOOT_COUNTER)
    row = listing(platform, "t1")
    assert row["attestation"] == "attested" and row["last_verified_boot"] is not None
    assert row["boot_counter"] != api.MAX_BOOT_COUNTER and "tpm (attested)" in run_cli(
        "appliance", "list", state_dir=platform.paths.root
    ).stdout.decode()
    assert len(await a.client.keyslot_passphrase()) > 32
    # A claim without evidence, or as a file keystore, is refused.
    await refused(a.client.open_session(10**6, "tpm"), api.REASON_ATTESTATION_REQUIRED)
    await refused(a.client.open_session(10**6, "file"), api.REASON_ATTESTATION_REQUIRED)
    # Re-enrolling (another TPM for the same identity) is refused.
    await refused(enroll(platform, a), api.REASON_ALREADY_ENROLLED)
    assert events(platform, "attestation_refused")


async def test_forged_counter_replayed_quote_and_other_pcrs_are_refused(
    trusting: Platform, ek_ca: EkCa, tpms: list[Swtpm], keystores: list[TpmKeystore], tmp_path: Path
) -> None:
    platform = trusting
    tpms.append(tpm := start_swtpm(tmp_path / "tpm", ek_ca=ek_ca))
    a = await activate_tpm(platform, "t2", tpm, tmp_path / "t2", keystores)
    await enroll(platform, a)
    counter, old = await boot_evidence(a.client, a.attestor)
    await a.client.open_session(counter, "tpm", old)
    # Replayed: the same evidence again (its nonce is used up), then with a fresh nonce.
    await refused(a.client.open_session(counter + 1, "tpm", old), api.REASON_NONCE_INVALID)
    fresh = await a.client.session_nonce()
    replay = {**old, api.F_NONCE: base64.b64encode(fresh).decode()}
    await refused(a.client.open_session(counter + 1, "tpm", replay), api.REASON_NONCE_INVALID)
    # Forged counter: the certified value changed by one bit.
    _, ev = await boot_evidence(a.client, a.attestor)
    blob = bytearray(base64.b64decode(ev[api.F_COUNTER][api.F_ATTEST]))
    blob[-1] ^= 0x40
    forged = {**ev, api.F_COUNTER: {**ev[api.F_COUNTER], api.F_ATTEST: base64.b64encode(bytes(blob)).decode()}}
    await refused(a.client.open_session(counter + 1, "tpm", forged), api.REASON_ATTESTATION_INVALID)
    # A quote over other PCRs than the recorded ones (0-9 for a keystore bound to none).
    a.keystore.pcrs = (16,)
    try:
        _, other = await boot_evidence(a.client, a.attestor)
    finally:
        a.keystore.pcrs = ()
    err = await refused(a.client.open_session(counter + 1, "tpm", other), api.REASON_ATTESTATION_INVALID)
    assert "16]" in str(err) and "not the recorded [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]" in str(err)
    # None of it moved the appliance: the next honest boot is accepted.
    await boot(a)
    assert not listing(platform, "t2")["quarantined"]


async def test_pcr_mismatch_is_refused_until_the_operator_accepts_the_new_baseline(
    trusting: Platform, ek_ca: EkCa, tpms: list[Swtpm], keystores: list[TpmKeystore], tmp_path: Path
) -> None:
    platform = trusting
    tpms.append(tpm := start_swtpm(tmp_path / "tpm", ek_ca=ek_ca))
    a = await activate_tpm(platform, "t3", tpm, tmp_path / "t3", keystores)
    await enroll(platform, a)
    await boot(a)
    tpm.extend_pcr(4)  # e.g. another boot loader (or kernel command line) measured
    await refused(boot(a), api.REASON_PCR_MISMATCH)
    row = listing(platform, "t3")
    assert row["pcr_state"] == "mismatch" and not row["quarantined"]
    assert events(platform, "pcr_mismatch")
    root = platform.paths.root
    shown = run_cli("appliance", "baseline", "t3", state_dir=root)
    assert shown.returncode == 0 and b"(changed)" in shown.stdout and shown.stdout.count(b"(changed)") == 1
    await refused(boot(a), api.REASON_PCR_MISMATCH)  # still refused: nothing accepted yet
    accepted = run_cli("appliance", "baseline", "t3", "--accept", state_dir=root)
    assert accepted.returncode == 0 and b"new PCR baseline accepted" in accepted.stdout
    assert "old_digest=" in events(platform, "pcr_baseline_changed")[-1]
    await boot(a)
    assert listing(platform, "t3")["pcr_state"] == "ok"
    again = run_cli("appliance", "baseline", "t3", "--accept", state_dir=root)
    assert again.returncode == 4 and len(again.stderr.splitlines()) == 1


async def test_keys_not_certified_as_tpm_resident_are_refused(
    trusting: Platform, ek_ca: EkCa, tpms: list[Swtpm], keystores: list[TpmKeystore], tmp_path: Path
) -> None:
    platform = trusting
    tpms.append(tpm := start_swtpm(tmp_path / "tpm", ek_ca=ek_ca))
    a = await activate_tpm(platform, "t4", tpm, tmp_path / "t4", keystores)
    # The appliance presents a KEK public area without FIXEDTPM|FIXEDPARENT (an exportable key).
    from tools.platform import attestation as at

    pub = at.parse_public(a.keystore.kek_public(), "kek")
    pub.publicArea.objectAttributes &= ~at.RESIDENT
    a.keystore.kek_public = lambda: bytes(pub.marshal())  # type: ignore[method-assign]
    await refused(enroll(platform, a), api.REASON_NOT_TPM_RESIDENT)
    assert listing(platform, "t4")["attestation"] is None


async def test_tpm_from_an_untrusted_manufacturer_is_refused(
    platform: Platform, tpms: list[Swtpm], keystores: list[TpmKeystore], tmp_path: Path
) -> None:
    other = EkCa(tmp_path / "other-ca")
    tpms.append(tpm := start_swtpm(tmp_path / "tpm", ek_ca=other))
    a = await activate_tpm(platform, "t5", tpm, tmp_path / "t5", keystores)
    await refused(enroll(platform, a), api.REASON_ATTESTATION_UNAVAILABLE)  # no EK CA configured
    trusted = EkCa(tmp_path / "trusted-ca")
    tpms.append(start_swtpm(tmp_path / "tpm2", ek_ca=trusted))
    assert run_cli("ek-ca", "set", str(trusted.bundle), state_dir=platform.paths.root).returncode == 0
    err = await refused(enroll(platform, a), api.REASON_ATTESTATION_INVALID)
    assert "not issued by a trusted EK CA" in str(err)


async def test_swtpm_copy_is_refused_and_clear_keeps_the_real_appliance(
    trusting: Platform, ek_ca: EkCa, tpms: list[Swtpm], keystores: list[TpmKeystore], tmp_path: Path
) -> None:
    """A copy of the disk and the software TPM's state: the copy signs like the original
    (a copied software TPM IS the TPM), but both advance the same counter on their own."""
    platform = trusting
    tpm = start_swtpm(tmp_path / "tpm", ek_ca=ek_ca)
    a = await activate_tpm(platform, "t6", tpm, tmp_path / "t6", keystores)
    await enroll(platform, a)
    await boot(a)
    keystores.remove(a.keystore)
    a.keystore.close()
    tpm.stop()
    copy_state(tpm, tmp_path / "clone-tpm")  # the thief's copy, taken while the appliance is off
    tpms.append(real_tpm := start_swtpm(tmp_path / "tpm"))
    tpms.append(clone_tpm := start_swtpm(tmp_path / "clone-tpm"))
    config = a.keystore.config()
    real_ks = TpmKeystore.open(tmp_path / "t6", config, real_tpm.tcti)
    clone_ks = TpmKeystore.open(tmp_path / "t6", config, clone_tpm.tcti)
    keystores += [real_ks, clone_ks]
    real = TpmAppliance("t6", a.client, a.cert_pem, a.x25519_public, real_ks, Attestor(real_ks))
    clone_client = client.PlatformClient(platform.url, a.client._ctx, timeout=20.0)  # same certificate and key
    clone = TpmAppliance("t6", clone_client, a.cert_pem, a.x25519_public, clone_ks, Attestor(clone_ks))
    real_session = await boot(real)  # the real appliance reboots
    with pytest.raises(client.QuarantinedError):
        await boot(clone)  # the copy boots: its certified counter is not above the real one's
    assert listing(platform, "t6")["quarantined"]
    # The operator keeps the real appliance's session: the copy's next boots stay refused,
    # the real appliance boots normally.
    root = platform.paths.root
    keep = api.session_id(real_session)
    proc = run_cli("appliance", "clear", "t6", "--keep", keep, state_dir=root)
    assert proc.returncode == 0, proc.stderr
    assert len(await real.client.keyslot_passphrase()) > 32  # the kept session still works
    await boot(real)
    with pytest.raises(client.QuarantinedError):
        await boot(clone)
    assert "is not above" in events(platform, db.EVENT_CLONE_SUSPECTED)[-1]


# --- boot reports: the appliance's TPM refused to unseal, so it has no client key ----------


def report_doc(name: str, nonce: bytes, quote: Evidence, values: list[bytes]) -> dict[str, object]:
    return {
        api.F_APPLIANCE: name,
        api.F_NONCE: base64.b64encode(nonce).decode(),
        api.F_QUOTE: {
            api.F_ATTEST: base64.b64encode(quote.attest).decode(),
            api.F_SIGNATURE: base64.b64encode(quote.signature).decode(),
            api.F_PCR_VALUES: [v.hex() for v in values],
        },
    }


async def fresh_report(platform: Platform, a: TpmAppliance, name: str | None = None) -> dict[str, object]:
    """A boot report as agent.boot_report makes it: an anonymous nonce, the AK's quote over it."""
    nonce = await platform.anon_client().session_nonce(api.PATH_BOOT_NONCE)
    quote, values = a.attestor.quote(nonce)
    return report_doc(name or a.name, nonce, quote, values)


async def raw_report(platform: Platform, doc: dict[str, object], path: str = api.PATH_BOOT_REPORT) -> tuple[int, bytes]:
    """POST a boot report (or *path*) without a client certificate; (status, raw body)."""
    body = json.dumps(doc).encode()
    request = (
        f"POST {path} HTTP/1.1\r\nhost: {HOSTNAME}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body
    tcp = await trio.open_tcp_stream("127.0.0.1", platform.port)
    stream = trio.SSLStream(tcp, tls_client(platform.ca_pem), server_hostname=HOSTNAME, https_compatible=True)
    buf = b""
    with trio.fail_after(20):
        await stream.send_all(request)
        while chunk := await stream.receive_some(65536):
            buf += chunk
    await trio.aclose_forcefully(stream)
    head, _, payload = buf.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), payload


async def enrolled_and_booted(platform: Platform, ek_ca: EkCa, tpms: list[Swtpm], keystores: list[TpmKeystore],
                              tmp_path: Path, name: str) -> tuple[TpmAppliance, Swtpm]:  # fmt: skip
    tpms.append(tpm := start_swtpm(tmp_path / f"tpm-{name}", ek_ca=ek_ca))
    a = await activate_tpm(platform, name, tpm, tmp_path / name, keystores)
    await enroll(platform, a)
    await boot(a)
    return a, tpm


async def test_boot_report_of_a_changed_pcr_is_recorded_as_a_mismatch(
    trusting: Platform, ek_ca: EkCa, tpms: list[Swtpm], keystores: list[TpmKeystore], tmp_path: Path
) -> None:
    platform = trusting
    a, tpm = await enrolled_and_booted(platform, ek_ca, tpms, keystores, tmp_path, "r1")
    before = listing(platform, "r1")
    sessions = run_cli("appliance", "sessions", "r1", state_dir=platform.paths.root).stdout
    tpm.extend_pcr(8)  # the kernel command line changed
    status, body = await raw_report(platform, {}, api.PATH_BOOT_NONCE)
    assert status == 200 and set(json.loads(body)) == {api.F_NONCE}  # a nonce and nothing else
    doc = await fresh_report(platform, a)
    status, body = await raw_report(platform, doc)
    assert (status, json.loads(body)) == (200, {api.F_VERDICT: api.VERDICT_PCR_MISMATCH})
    row = listing(platform, "r1")
    assert row["pcr_state"] == "mismatch" and not row["quarantined"]
    # Recorded exactly as a session's mismatch: the same event, the same operator view.
    assert "quoted_digest=" in events(platform, "pcr_mismatch")[-1]
    assert "boot refused since" in run_cli("appliance", "list", state_dir=platform.paths.root).stdout.decode()
    shown = run_cli("appliance", "baseline", "r1", state_dir=platform.paths.root).stdout
    assert shown.count(b"(changed)") == 1
    # A report unlocks nothing and advances nothing.
    assert row["boot_counter"] == before["boot_counter"] and row["last_boot"] == before["last_boot"]
    assert run_cli("appliance", "sessions", "r1", state_dir=platform.paths.root).stdout == sessions
    # The same report again: its nonce is used.
    status, body = await raw_report(platform, doc)
    assert (status, json.loads(body)["reason"]) == (403, api.REASON_NONCE_INVALID)
    # The operator resolves it as for a session's mismatch; then the appliance boots.
    accepted = run_cli("appliance", "baseline", "r1", "--accept", state_dir=platform.paths.root)
    assert accepted.returncode == 0, accepted.stderr
    await boot(a)
    assert listing(platform, "r1")["pcr_state"] == "ok"


async def test_restored_pcrs_clear_the_mismatch_without_the_operator(
    trusting: Platform, ek_ca: EkCa, tpms: list[Swtpm], keystores: list[TpmKeystore], tmp_path: Path
) -> None:
    """A mismatch, then a boot whose quote matches the baseline again (the kernel command line
    restored): verified, the state clears and the refused values cannot be accepted by mistake."""
    platform = trusting
    a, tpm = await enrolled_and_booted(platform, ek_ca, tpms, keystores, tmp_path, "r2")
    baseline = run_cli("appliance", "baseline", "r2", state_dir=platform.paths.root).stdout
    tpm.extend_pcr(8)
    await refused(boot(a), api.REASON_PCR_MISMATCH)
    a.keystore.close()
    tpm.stop()  # a reboot resets the PCRs: the same TPM state, the original boot chain
    tpms.append(rebooted := start_swtpm(tmp_path / "tpm-r2"))
    ks = TpmKeystore.open(tmp_path / "r2", a.keystore.config(), rebooted.tcti)
    keystores.remove(a.keystore)
    keystores.append(ks)
    await boot(TpmAppliance("r2", a.client, a.cert_pem, a.x25519_public, ks, Attestor(ks)))
    assert listing(platform, "r2")["pcr_state"] == "ok"
    assert events(platform, "pcr_restored")
    assert run_cli("appliance", "baseline", "r2", state_dir=platform.paths.root).stdout == baseline
    again = run_cli("appliance", "baseline", "r2", "--accept", state_dir=platform.paths.root)
    assert again.returncode == 4 and b"no refused quote" in again.stderr


async def test_boot_reports_that_do_not_verify_are_refused(
    trusting: Platform, ek_ca: EkCa, tpms: list[Swtpm], keystores: list[TpmKeystore], tmp_path: Path
) -> None:
    platform = trusting
    a, tpm = await enrolled_and_booted(platform, ek_ca, tpms, keystores, tmp_path, "r3")
    mismatches = len(events(platform, "pcr_mismatch"))

    async def refused_report(doc: dict[str, object], status: int, reason: str) -> str:
        got, body = await raw_report(platform, doc)
        answer = json.loads(body)
        assert (got, answer["reason"]) == (status, reason), answer
        assert set(answer) <= {"error", "reason"}, answer  # a refusal carries nothing else
        return str(answer["error"])

    # A quote that matches the baseline: nothing to report (and the counter is not touched).
    await refused_report(await fresh_report(platform, a), 409, api.REASON_PCR_MATCH)
    assert "reason=pcr_match" in events(platform, "attestation_refused")[-1]
    tpm.extend_pcr(8)
    # A nonce the platform never issued, and one it issued too long ago.
    doc = await fresh_report(platform, a)
    forged = {**doc, api.F_NONCE: base64.b64encode(bytes(api.NONCE_BYTES)).decode()}
    assert "not issued by this platform" in await refused_report(forged, 403, api.REASON_NONCE_INVALID)
    nonces = BootNonces(state.load_kek(platform.paths))
    old = nonces.issue(time.time() - api.BOOT_NONCE_TTL - 5)
    quote, values = a.attestor.quote(old)
    expired = report_doc("r3", old, quote, values)
    assert "expired" in await refused_report(expired, 403, api.REASON_NONCE_INVALID)
    # A valid nonce, but the quote is over another one.
    other_nonce = await platform.anon_client().session_nonce(api.PATH_BOOT_NONCE)
    swapped = {**doc, api.F_NONCE: base64.b64encode(other_nonce).decode()}
    await refused_report(swapped, 403, api.REASON_NONCE_INVALID)
    # Signed by another TPM's AK (another appliance, enrolled itself), named as r3.
    b, _ = await enrolled_and_booted(platform, ek_ca, tpms, keystores, tmp_path, "r4")
    by_other = await refused_report(await fresh_report(platform, b, name="r3"), 403, api.REASON_ATTESTATION_INVALID)
    # An unknown appliance is refused in the same words (no oracle for names).
    unknown = await refused_report(await fresh_report(platform, a, name="nobody"), 403, api.REASON_ATTESTATION_INVALID)
    assert unknown == by_other
    # A deactivated appliance's reports are refused like an unknown one's.
    run_cli("appliance", "deactivate", "r4", state_dir=platform.paths.root)
    await refused_report(await fresh_report(platform, b), 403, api.REASON_ATTESTATION_INVALID)
    # None of it was recorded, and none of it wrote an audit row an anonymous party could flood.
    assert len(events(platform, "pcr_mismatch")) == mismatches
    assert listing(platform, "r3")["pcr_state"] == "ok"
    # Finally the genuine report, after all that: still accepted.
    status, body = await raw_report(platform, await fresh_report(platform, a))
    assert status == 200 and set(json.loads(body)) == {api.F_VERDICT}
