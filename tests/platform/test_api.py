"""End-to-end API tests through the real client against the real server (TLS on loopback)."""

from __future__ import annotations

import hashlib
import json
import time

import pytest

from protocol import api, client, credential, scope, sealing
from tests.platform.conftest import Platform
from tools.platform import db, keys


async def test_time_without_client_cert(platform: Platform) -> None:
    before = time.time()
    t = await platform.anon_client().time()
    assert before - 1 <= t <= time.time() + 1


async def test_activation_flow_and_volume_key(platform: Platform) -> None:
    a = await platform.activate("alpha")
    row = platform.storage.appliance("alpha")
    assert row.state == "active"
    assert row.x25519_public == a.x25519_public
    sealed = await a.client.keyslot_passphrase()
    vk = sealing.open_sealed(a.x25519_private, sealed, api.SEAL_CONTEXT_VOLUME_KEY)
    assert len(vk) == 32
    # It is the key stored (wrapped) for this appliance, and the access was logged.
    kek = platform.paths.kek.read_bytes()
    wrapped = platform.storage.wrapped_keyslot_passphrase(row.id)
    assert wrapped is not None
    assert bytes(keys.unwrap(kek, wrapped, row.id, "alpha")) == bytes(vk)
    assert bytes(vk) not in wrapped
    assert [e for e in platform.storage.events("volume_key") if e[1] == row.id]
    # Sealed freshly each time (new ephemeral key), same key inside.
    sealed2 = await a.client.keyslot_passphrase()
    assert sealed2 != sealed
    assert sealing.open_sealed(a.x25519_private, sealed2, api.SEAL_CONTEXT_VOLUME_KEY) == vk
    # The blob is not a credential: context binding.
    with pytest.raises(sealing.SealError):
        sealing.open_sealed(a.x25519_private, sealed, api.SEAL_CONTEXT_CREDENTIAL)


async def test_each_appliance_gets_only_its_own_key(platform: Platform) -> None:
    a = await platform.activate("a1")
    b = await platform.activate("b1")
    ka = sealing.open_sealed(a.x25519_private, await a.client.keyslot_passphrase(), b"volume-key")
    sealed_b = await b.client.keyslot_passphrase()
    kb = sealing.open_sealed(b.x25519_private, sealed_b, b"volume-key")
    assert ka != kb
    with pytest.raises(sealing.SealError):
        sealing.open_sealed(a.x25519_private, sealed_b, b"volume-key")


async def test_activation_code_single_use(platform: Platform) -> None:
    code = platform.add_appliance("once")
    _key_pem, csr = client.new_client_key_and_csr("once")
    _, xpub = sealing.generate_keypair()
    anon = platform.anon_client()
    await anon.activate(code, csr, xpub)
    with pytest.raises(client.PlatformError) as ei:
        await anon.activate(code, csr, xpub)
    assert (ei.value.status, ei.value.reason) == (403, api.REASON_INVALID_CODE)
    assert code not in str(ei.value)


async def test_activation_code_expires(platform: Platform) -> None:
    code = platform.add_appliance("late", ttl=0.2)
    _, csr = client.new_client_key_and_csr("late")
    _, xpub = sealing.generate_keypair()
    time.sleep(0.3)
    with pytest.raises(client.PlatformError) as ei:
        await platform.anon_client().activate(code, csr, xpub)
    assert (ei.value.status, ei.value.reason) == (403, api.REASON_CODE_EXPIRED)
    assert platform.storage.appliance("late").state == "pending"


async def test_activation_rejects_bad_input(platform: Platform) -> None:
    code = platform.add_appliance("bad")
    _, xpub = sealing.generate_keypair()
    anon = platform.anon_client()
    with pytest.raises(client.PlatformError) as ei:
        await anon.activate(code, b"-----BEGIN CERTIFICATE REQUEST-----\nxx\n", xpub)
    assert (ei.value.status, ei.value.reason) == (400, api.REASON_BAD_REQUEST)
    _, csr = client.new_client_key_and_csr("bad")
    with pytest.raises(client.PlatformError) as ei:
        await anon.activate(code, csr, xpub[:31])
    assert ei.value.status == 400
    # The code was not consumed by the failed attempts.
    res = await anon.activate(code, csr, xpub)
    assert res.appliance == "bad"


async def test_jobs_lease_result_ack(platform: Platform) -> None:
    a = await platform.activate("scanner1")
    assert await a.client.next_job(wait=0) is None
    job_id = platform.storage.add_job("scanner1", ["127.0.0.1"], "22,80-81", "builtin", None, time.time())
    job = await a.client.next_job(wait=5)
    assert job is not None
    assert job.id == str(job_id)
    assert job.targets == ("127.0.0.1",)
    assert job.ports == "22,80-81"
    assert job.credential is None and job.attempt == 1
    await a.client.progress(job.id, "scanning 3 ports")
    assert platform.storage.job(job_id).progress == "scanning 3 ports"
    body = json.dumps({"hosts": []}).encode()
    digest = await a.client.upload_result(job.id, body)
    assert digest == hashlib.sha256(body).hexdigest()
    res = platform.storage.result(job_id)
    assert res.body == body and res.sha256 == digest
    assert platform.storage.job(job_id).state == "done"
    # Re-upload of the same body is acknowledged again (lost-ack retry) without a new row.
    assert await a.client.upload_result(job.id, body) == digest
    with pytest.raises(client.PlatformError) as ei:
        await a.client.upload_result(job.id, b"different")
    assert (ei.value.status, ei.value.reason) == (409, api.REASON_ALREADY_COMPLETED)
    assert len(platform.storage.events("completed")) == 1
    # A done job is not offered again.
    assert await a.client.next_job(wait=0.2) is None


async def test_long_poll_wakes_on_new_job(platform: Platform) -> None:
    import trio

    a = await platform.activate("poller")
    got: list[client.Job | None] = []

    async def poll() -> None:
        got.append(await a.client.next_job(wait=20))

    async with trio.open_nursery() as n:
        n.start_soon(poll)
        await trio.sleep(0.3)
        platform.storage.add_job("poller", ["10.0.0.0/30"], "443", "nmap", None, time.time())
    assert got and got[0] is not None and got[0].engine == "nmap"


def _scoped_blob(public: bytes, secret: bytes, targets: list[str]) -> bytes:
    sc = scope.Scope.build(targets, "21,22", ["ssh"])
    plain = credential.pack(credential.Metadata("password", "u", sc), bytearray(secret))
    return sealing.seal_v2(public, plain, api.SEAL_CONTEXT_CREDENTIAL, sc.to_bytes())


async def test_credential_travels_sealed(platform: Platform) -> None:
    a = await platform.activate("credapp", hybrid=True)
    assert a.hybrid_public is not None and a.hybrid_private is not None
    secret = b"hunter2-canary-credential"
    blob = _scoped_blob(a.hybrid_public, secret, ["127.0.0.0/30"])
    platform.storage.add_credential("credapp", "ftp", blob, time.time())
    platform.storage.add_job("credapp", ["127.0.0.1"], "21", "builtin", "ftp", time.time())
    job = await a.client.next_job(wait=5)
    assert job is not None and job.credential_name == "ftp"
    assert job.credential == blob
    assert "hunter2" not in repr(job) and repr(blob)[:20] not in repr(job)
    opened = sealing.open_any(a.x25519_private, a.hybrid_private, job.credential, b"credential")
    meta, got = credential.unpack(opened)
    assert bytes(got) == secret and meta.scope.targets == ("127.0.0.0/30",)
    # The platform's database never saw the plaintext.
    for p in platform.paths.root.iterdir():
        assert secret not in p.read_bytes(), p


async def test_job_outside_the_public_scope_is_refused(platform: Platform) -> None:
    a = await platform.activate("scoped", hybrid=True)
    assert a.hybrid_public is not None
    blob = _scoped_blob(a.hybrid_public, b"s", ["10.1.0.0/24", "db.example"])
    platform.storage.add_credential("scoped", "c", blob, 1.0)
    platform.storage.add_job("scoped", ["10.1.0.7", "10.1.0.128/25", "DB.example"], "22", "builtin", "c", 1.0)
    for targets in (["10.1.0.7", "10.2.0.1"], ["10.1.0.0/23"], ["evil.example"]):
        with pytest.raises(db.OutOfScope, match="outside the scope"):
            platform.storage.add_job("scoped", targets, "22", "builtin", "c", 1.0)
    # A credential stored before sealing v2 has no scope: refused, saying what to do.
    platform.storage.add_credential("scoped", "old", sealing.seal(a.x25519_public, b"s", b"credential"), 1.0)
    with pytest.raises(db.OutOfScope, match="re-seal it with scanner-seal"):
        platform.storage.add_job("scoped", ["10.1.0.7"], "22", "builtin", "old", 1.0)


async def test_v1_appliance_moves_to_the_hybrid_key_over_mtls(platform: Platform) -> None:
    a = await platform.activate("oldapp")  # an appliance from before sealing v2
    v1 = await a.client.keyslot_passphrase()
    assert sealing.check_format(v1) == 1
    vk = sealing.open_sealed(a.x25519_private, v1, api.SEAL_CONTEXT_VOLUME_KEY)
    hpriv, hpub = sealing.generate_hybrid_keypair()
    await a.client.upload_seal_key(hpub)
    await a.client.upload_seal_key(hpub)  # idempotent: a crashed upgrade may resend
    v2 = await a.client.keyslot_passphrase()
    assert sealing.check_format(v2) == 2
    assert sealing.open_any(a.x25519_private, hpriv, v2, api.SEAL_CONTEXT_VOLUME_KEY) == vk
    with pytest.raises(sealing.SealError, match="seal-key upgrade"):
        sealing.open_any(a.x25519_private, None, v2, api.SEAL_CONTEXT_VOLUME_KEY)
    _, other = sealing.generate_hybrid_keypair()
    with pytest.raises(client.PlatformError) as e:
        await a.client.upload_seal_key(other)
    assert e.value.status == 409 and e.value.reason == api.REASON_KEY_CONFLICT
    with pytest.raises(client.PlatformError) as e:
        await platform.anon_client().upload_seal_key(hpub)
    assert e.value.status == 401
    with pytest.raises(client.PlatformError) as e:
        await a.client._json("POST", api.PATH_SEAL_KEY, {api.F_HYBRID_PUBLIC: "AAAA"})
    assert e.value.status == 400
    assert platform.storage.appliance("oldapp").hybrid_public == hpub


async def test_config_reports_syslog_target(platform: Platform) -> None:
    a = await platform.activate("logger")
    assert (await a.client.config()).syslog is None
    platform.storage.set_setting("syslog", {"host": "127.0.0.1", "port": 6514, "ca": platform.ca_pem.decode()})
    cfg = await a.client.config()
    assert cfg.syslog is not None
    assert (cfg.syslog.host, cfg.syslog.port, cfg.syslog.ca_pem) == ("127.0.0.1", 6514, platform.ca_pem)
