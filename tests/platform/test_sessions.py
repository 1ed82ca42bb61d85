"""Clone detection: boot sessions, boot counters, quarantine, operator clear; certificate
renewal (the keystore migration's endpoint). Real TLS, real SQLite, in-process server."""

from __future__ import annotations

import time

import pytest

from protocol import api, client
from tests.platform.conftest import Appliance, Platform, run_cli, tls_client
from tools.platform import db


def twin(platform: Platform, a: Appliance) -> client.PlatformClient:
    """A second instance holding the same certificate and key: what a disk copy is."""
    return client.PlatformClient(platform.url, tls_client(platform.ca_pem, a.cert_pem, a.key_pem), timeout=20.0)


def quarantined(platform: Platform, name: str) -> bool:
    app = platform.storage.appliance(name)
    state = platform.storage.clone_states().get(app.id)
    return state is not None and state.quarantined_since is not None


async def test_keys_and_jobs_need_a_session_config_does_not(platform: Platform) -> None:
    a = await platform.activate("s1")
    bare = twin(platform, a)
    for call in (bare.keyslot_passphrase(), bare.next_job(wait=0)):
        with pytest.raises(client.PlatformError) as ei:
            await call
        assert (ei.value.status, ei.value.reason) == (428, api.REASON_SESSION_REQUIRED)
    bare.session = "made-up-token"
    with pytest.raises(client.PlatformError) as ei:
        await bare.keyslot_passphrase()
    assert ei.value.reason == api.REASON_SESSION_REQUIRED
    assert (await bare.config()).syslog is None
    assert not quarantined(platform, "s1")
    assert len(await a.client.keyslot_passphrase()) > 32


async def test_boot_counter_going_back_quarantines(platform: Platform) -> None:
    a = await platform.activate("c1")  # boot 1
    copy = twin(platform, a)
    with pytest.raises(client.QuarantinedError):
        await copy.open_session(1, "file")  # a copy of the disk boots with the same counter
    assert quarantined(platform, "c1")
    events = [e for e in platform.storage.events(db.EVENT_CLONE_SUSPECTED)]
    assert len(events) == 1 and "boot counter 1 is not above 1" in events[0][4]
    # Quarantine stops everything that matters, for every session, until cleared.
    for call in (a.client.keyslot_passphrase(), a.client.next_job(wait=0)):
        with pytest.raises(client.QuarantinedError):
            await call
    with pytest.raises(client.QuarantinedError):
        await copy.open_session(7, "file")
    platform.storage.clear_quarantine("c1", time.time())
    assert not quarantined(platform, "c1")
    assert len(await a.client.keyslot_passphrase()) > 32
    with pytest.raises(db.Conflict):
        platform.storage.clear_quarantine("c1", time.time())


async def test_interleaving_sessions_quarantine(platform: Platform) -> None:
    a = await platform.activate("i1")  # boot 1: session s1
    other = twin(platform, a)
    await other.open_session(2, "file")  # a second instance boots later: s2 is now current
    assert await other.next_job(wait=0) is None
    with pytest.raises(client.QuarantinedError):
        await a.client.next_job(wait=0)  # s1 still in use: two live instances
    (event,) = platform.storage.events(db.EVENT_CLONE_SUSPECTED)
    assert "superseded session (boot 1) while boot 2 is live" in event[4]
    assert platform.storage.events("quarantined")
    with pytest.raises(client.QuarantinedError):
        await other.keyslot_passphrase()


async def test_policy_off_records_but_does_not_quarantine(platform: Platform) -> None:
    platform.storage.set_setting(db.SETTING_CLONE_QUARANTINE, False)
    a = await platform.activate("p1")
    other = twin(platform, a)
    await other.open_session(1, "file")
    assert await a.client.next_job(wait=0) is None
    assert len(platform.storage.events(db.EVENT_CLONE_SUSPECTED)) == 2
    assert not quarantined(platform, "p1")


async def test_sessions_per_appliance_are_bounded(platform: Platform) -> None:
    a = await platform.activate("b1")
    for n in range(2, db.MAX_SESSIONS_PER_APPLIANCE + 10):
        await a.client.open_session(n, "tpm")
    app = platform.storage.appliance("b1")
    rows = platform.storage.execute_for_tests("SELECT COUNT(*) FROM sessions WHERE appliance_id = ?", (app.id,))
    assert rows[0][0] == db.MAX_SESSIONS_PER_APPLIANCE
    assert platform.storage.clone_states()[app.id].boot_counter == db.MAX_SESSIONS_PER_APPLIANCE + 9


async def test_certificate_renewal_revokes_the_old_certificate(platform: Platform) -> None:
    a = await platform.activate("r1")
    key_pem, csr = client.new_client_key_and_csr("r1")
    cert = await a.client.renew_certificate(csr)
    with pytest.raises(client.DeactivatedError):
        await a.client.keyslot_passphrase()  # the old certificate is revoked at once
    renewed = client.PlatformClient(platform.url, tls_client(platform.ca_pem, cert, key_pem))
    await renewed.open_session(2, "tpm")
    assert len(await renewed.keyslot_passphrase()) > 32
    kinds = [e[3] for e in platform.storage.events() if e[3] == "certificate_renewed"]
    assert kinds == ["certificate_renewed"]
    assert len(platform.storage.revoked()) == 1


async def test_cli_list_clear_and_policy(platform: Platform) -> None:
    root = platform.paths.root
    code = platform.add_appliance("q1")
    assert code
    app = platform.storage.appliance("q1")
    platform.storage.open_session(app.id, b"\x01" * 32, 5, "file", time.time())
    platform.storage.open_session(app.id, b"\x02" * 32, 3, "file", time.time())
    out = run_cli("appliance", "list", state_dir=root)
    assert out.returncode == 0 and b"quarantined" not in out.stdout  # pending: shown as its state
    platform.storage.execute_for_tests("UPDATE appliances SET state = 'active' WHERE id = ?", (app.id,))
    out = run_cli("appliance", "list", state_dir=root).stdout.decode()
    [row] = [ln for ln in out.splitlines() if ln.startswith("q1 ")]
    assert row.split()[:3] == ["q1", "active", "quarantined"] and " file " in row, out  # STATE, HEALTH
    assert "boot counter 3 is not above 5" in out
    proc = run_cli("appliance", "clear", "q1", state_dir=root)
    assert proc.returncode == 0 and b"released" in proc.stdout
    proc = run_cli("appliance", "clear", "q1", state_dir=root)
    assert proc.returncode == 4 and len(proc.stderr.splitlines()) == 1
    assert run_cli("appliance", "clear", "ghost", state_dir=root).returncode == 3
    assert run_cli("policy", "clone-quarantine", state_dir=root).stdout == b"clone-quarantine on\n"
    assert run_cli("policy", "clone-quarantine", "off", state_dir=root).stdout == b"clone-quarantine off\n"
    assert platform.storage.get_setting(db.SETTING_CLONE_QUARANTINE) is False
