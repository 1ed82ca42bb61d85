"""Refusals: missing/foreign/revoked certificates, other appliances' jobs, malformed and
oversized requests, wrong digests, old TLS, wrong hostnames, and crypto-shredding."""

from __future__ import annotations

import hashlib
import json
import logging
import ssl
import time
import warnings
from pathlib import Path

import pytest
import trio

from protocol import api, client, sealing
from tests.platform.conftest import HOSTNAME, Appliance, Platform, init_state, tls_client
from tools.platform import ca, keys


async def raw_exchange(
    platform: Platform, ctx: ssl.SSLContext, data: bytes, *, hang_up: bool = False
) -> tuple[int, dict[str, str]]:
    """Send raw bytes over TLS; return (status, JSON body) of the response."""
    tcp = await trio.open_tcp_stream("127.0.0.1", platform.port)
    s = trio.SSLStream(tcp, ctx, server_hostname=HOSTNAME, https_compatible=True)
    with trio.fail_after(20):
        await s.send_all(data)
        if hang_up:
            await trio.aclose_forcefully(s)
            return 0, {}
        buf = b""
        while not _complete(buf):  # EOF, or a whole response on a kept-alive connection
            try:
                chunk = await s.receive_some(65536)
            except trio.BrokenResourceError:
                break
            if not chunk:
                break
            buf += chunk
    await trio.aclose_forcefully(s)
    head, _, body = buf.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, (json.loads(body) if body else {})


def _complete(buf: bytes) -> bool:
    head, sep, body = buf.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return head.split(b" ", 2)[1] in (b"204", b"304")


def appliance_ctx(platform: Platform, a: Appliance) -> ssl.SSLContext:
    return tls_client(platform.ca_pem, a.cert_pem, a.key_pem)


def other_ca_client_ctx(platform: Platform, tmp_path: Path) -> ssl.SSLContext:
    """A client certificate named like an appliance but issued by another CA."""
    other = init_state(tmp_path / "other", HOSTNAME)
    authority = ca.load_ca(other.ca_key.read_bytes(), other.ca_cert.read_bytes())
    key_pem, csr_pem = client.new_client_key_and_csr("alpha")
    cert = ca.issue_client_cert(authority, ca.check_csr(csr_pem), "alpha")
    return tls_client(platform.ca_pem, cert.pem, key_pem)


async def test_mtls_endpoints_refuse_missing_client_cert(platform: Platform) -> None:
    a = await platform.activate("alpha")
    job_id = platform.storage.add_job("alpha", ["127.0.0.1"], "22", "builtin", None, time.time())
    anon = platform.anon_client()
    calls = [
        anon.keyslot_passphrase(),
        anon.config(),
        anon.next_job(wait=0),
        anon.upload_result(str(job_id), b"{}"),
        anon.progress(str(job_id), "x"),
    ]
    for call in calls:
        with pytest.raises(client.PlatformError) as ei:
            await call
        assert (ei.value.status, ei.value.reason) == (401, api.REASON_CLIENT_CERT_REQUIRED)
    assert platform.storage.job(job_id).state == "queued"
    assert a.name == "alpha"


async def test_certificate_from_another_ca_fails_tls(platform: Platform, tmp_path: Path) -> None:
    await platform.activate("alpha")
    foreign = client.PlatformClient(platform.url, other_ca_client_ctx(platform, tmp_path))
    with pytest.raises(client.PlatformTLSError):
        await foreign.keyslot_passphrase()
    with pytest.raises(client.PlatformTLSError):
        await foreign.time()


async def test_unknown_certificate_of_our_ca_refused(platform: Platform) -> None:
    # Signed by our CA but never issued through activation (e.g. a stolen CA signing
    # request path): not on record, so refused.
    authority = ca.load_ca(platform.paths.ca_key.read_bytes(), platform.ca_pem)
    key_pem, csr_pem = client.new_client_key_and_csr("ghost")
    cert = ca.issue_client_cert(authority, ca.check_csr(csr_pem), "ghost")
    ghost = client.PlatformClient(platform.url, tls_client(platform.ca_pem, cert.pem, key_pem))
    with pytest.raises(client.PlatformError) as ei:
        await ghost.keyslot_passphrase()
    assert (ei.value.status, ei.value.reason) == (403, api.REASON_UNKNOWN_CERTIFICATE)


async def test_client_refuses_untrusted_server(platform: Platform, tmp_path: Path) -> None:
    other = init_state(tmp_path / "other2", HOSTNAME)
    c = client.PlatformClient(platform.url, tls_client(other.ca_cert.read_bytes()))
    with pytest.raises(client.PlatformTLSError) as ei:
        await c.time()
    assert "certificate verify failed" in str(ei.value) or "verification" in str(ei.value)


async def test_client_refuses_wrong_hostname(platform: Platform) -> None:
    # The server certificate names "localhost"; 127.0.0.1 is the same socket, other name.
    c = client.PlatformClient(f"https://127.0.0.1:{platform.port}", tls_client(platform.ca_pem))
    with pytest.raises(client.PlatformTLSError) as ei:
        await c.time()
    assert "mismatch" in str(ei.value).lower()


async def test_tls_1_1_refused_by_server(platform: Platform, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="scanner-platform")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # deprecated is the point
            ctx.minimum_version = ssl.TLSVersion.TLSv1_1
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        ctx.set_ciphers("ALL:@SECLEVEL=0")
    except (ValueError, ssl.SSLError):
        pytest.skip("this OpenSSL build cannot even offer TLS 1.1")
    tcp = await trio.open_tcp_stream("127.0.0.1", platform.port)
    s = trio.SSLStream(tcp, ctx, server_hostname=HOSTNAME)
    with pytest.raises(trio.BrokenResourceError) as ei:
        with trio.fail_after(10):
            await s.do_handshake()
    await trio.aclose_forcefully(s)
    cause = ei.value.__cause__
    assert isinstance(cause, ssl.SSLError)
    # It is the server that refused (its log names the protocol), not our own client.
    assert "VERSION" in str(cause.reason).upper(), cause
    assert any("event=tls_handshake_failed" in r.getMessage() and "PROTOCOL" in r.getMessage() for r in caplog.records)
    # And the platform still serves TLS 1.2 clients.
    ctx12 = tls_client(platform.ca_pem)
    ctx12.maximum_version = ssl.TLSVersion.TLSv1_2
    assert await client.PlatformClient(platform.url, ctx12).time() > 0


async def test_deactivated_appliance_gets_403_everywhere(platform: Platform) -> None:
    a = await platform.activate("victim")
    b = await platform.activate("bystander")
    row = platform.storage.appliance("victim")
    wrapped = platform.storage.wrapped_keyslot_passphrase(row.id)
    assert wrapped is not None
    job_id = platform.storage.add_job("victim", ["127.0.0.1"], "22", "builtin", None, time.time())
    platform.storage.deactivate("victim", time.time())
    calls = [
        a.client.time(),
        a.client.keyslot_passphrase(),
        a.client.config(),
        a.client.next_job(wait=0),
        a.client.upload_result(str(job_id), b"{}"),
        a.client.progress(str(job_id), "x"),
    ]
    for call in calls:
        with pytest.raises(client.DeactivatedError) as ei:
            await call
        assert (ei.value.status, ei.value.reason) == (403, api.REASON_DEACTIVATED)
    # Crypto-shred: the wrapped key is gone from every database file, not just the row.
    assert platform.storage.wrapped_keyslot_passphrase(row.id) is None
    for p in platform.paths.root.iterdir():
        if p.name.startswith("platform.db"):
            assert wrapped not in p.read_bytes(), p.name
    # Revocation is on the list; the other appliance is unaffected.
    assert row.cert_serial in dict(platform.storage.revoked())
    assert len(await b.client.keyslot_passphrase()) > 32


async def test_revoked_certificate_is_deactivated(platform: Platform) -> None:
    a = await platform.activate("revokee")
    row = platform.storage.appliance("revokee")
    platform.storage.execute_for_tests(  # a revocation entry alone (no deactivation) suffices
        "INSERT INTO revoked (serial, fingerprint, appliance_id, revoked_at, reason) VALUES (?, ?, ?, ?, 'test')",
        (row.cert_serial, row.cert_fingerprint, row.id, time.time()),
    )
    with pytest.raises(client.DeactivatedError):
        await a.client.keyslot_passphrase()


async def test_other_appliances_job_is_not_found(platform: Platform) -> None:
    owner = await platform.activate("owner")
    thief = await platform.activate("thief")
    job_id = platform.storage.add_job("owner", ["127.0.0.1"], "22", "builtin", None, time.time())
    assert await thief.client.next_job(wait=0) is None
    for call in (thief.client.upload_result(str(job_id), b"{}"), thief.client.progress(str(job_id), "mine now")):
        with pytest.raises(client.PlatformError) as ei:
            await call
        assert (ei.value.status, ei.value.reason) == (404, api.REASON_NOT_FOUND)
    # Same answer as a job that does not exist at all.
    with pytest.raises(client.PlatformError) as ei:
        await thief.client.upload_result("999999", b"{}")
    assert ei.value.status == 404
    assert platform.storage.result_count(job_id) == 0
    assert platform.storage.job(job_id).progress is None
    assert await owner.client.next_job(wait=1) is not None


async def test_malformed_requests_get_clear_4xx(platform: Platform) -> None:
    a = await platform.activate("fuzzed")
    anon = tls_client(platform.ca_pem)
    mtls = appliance_ctx(platform, a)
    host = f"host: {HOSTNAME}\r\n".encode()

    body = b"{not json"
    st, doc = await raw_exchange(
        platform, anon, b"POST /v1/activate HTTP/1.1\r\n" + host + b"content-length: %d\r\n\r\n" % len(body) + body
    )
    assert (st, doc["reason"]) == (400, api.REASON_BAD_REQUEST)
    body = b"[1, 2]"
    st, doc = await raw_exchange(
        platform, anon, b"POST /v1/activate HTTP/1.1\r\n" + host + b"content-length: %d\r\n\r\n" % len(body) + body
    )
    assert (st, doc["reason"]) == (400, api.REASON_BAD_REQUEST)
    st, doc = await raw_exchange(platform, anon, b"GARBAGE\r\n\r\n")
    assert st == 400
    st, doc = await raw_exchange(platform, anon, b"GET /v1/nothing HTTP/1.1\r\n" + host + b"\r\n")
    assert (st, doc["reason"]) == (404, api.REASON_NOT_FOUND)
    st, doc = await raw_exchange(platform, anon, b"DELETE /v1/time HTTP/1.1\r\n" + host + b"\r\n")
    assert (st, doc["reason"]) == (405, api.REASON_METHOD_NOT_ALLOWED)
    session = f"{api.HEADER_SESSION}: {a.client.session}\r\n".encode()
    st, doc = await raw_exchange(
        platform, mtls, b"GET /v1/jobs/next?wait=soon HTTP/1.1\r\n" + host + session + b"\r\n"
    )
    assert (st, doc["reason"]) == (400, api.REASON_BAD_REQUEST)
    huge = b"x" * (api.MAX_HEADER_BYTES * 2)
    st, doc = await raw_exchange(platform, anon, b"GET /v1/time HTTP/1.1\r\n" + host + b"x-big: " + huge + b"\r\n\r\n")
    assert st == 431
    body = b'{"text": "' + b"y" * (api.MAX_JSON_BODY + 10) + b'"}'
    st, doc = await raw_exchange(
        platform, anon, b"POST /v1/activate HTTP/1.1\r\n" + host + b"content-length: %d\r\n\r\n" % len(body) + body
    )
    assert (st, doc["reason"]) == (413, api.REASON_TOO_LARGE)
    # The server is still healthy and stored nothing.
    assert await platform.anon_client().time() > 0
    assert platform.storage.jobs() == []


async def test_wrong_digest_and_oversized_result_store_nothing(platform: Platform) -> None:
    a = await platform.activate("uploader")
    job_id = platform.storage.add_job("uploader", ["127.0.0.1"], "22", "builtin", None, time.time())
    job = await a.client.next_job(wait=5)
    assert job is not None
    ctx = appliance_ctx(platform, a)
    session = f"{api.HEADER_SESSION}: {a.client.session}\r\n".encode()
    body = b'{"hosts": []}'
    wrong = hashlib.sha256(b"something else").hexdigest().encode()
    st, doc = await raw_exchange(
        platform,
        ctx,
        b"POST /v1/jobs/%d/result HTTP/1.1\r\nhost: %s\r\nx-content-sha256: %s\r\n%s"
        b"content-length: %d\r\n\r\n%s" % (job_id, HOSTNAME.encode(), wrong, session, len(body), body),
    )
    assert (st, doc["reason"]) == (400, api.REASON_DIGEST_MISMATCH)
    st, doc = await raw_exchange(
        platform,
        ctx,
        b"POST /v1/jobs/%d/result HTTP/1.1\r\nhost: %s\r\n%scontent-length: 2\r\n\r\n{}"
        % (job_id, HOSTNAME.encode(), session),
    )
    assert (st, doc["reason"]) == (400, api.REASON_BAD_REQUEST)
    big = b"z" * (platform_max(platform) + 1)
    with pytest.raises(client.PlatformError) as ei:
        await a.client.upload_result(job.id, big)
    assert (ei.value.status, ei.value.reason) == (413, api.REASON_TOO_LARGE)
    assert platform.storage.result_count(job_id) == 0
    assert platform.storage.job(job_id).state == "leased"
    # The exact limit is accepted.
    ok = b"z" * platform_max(platform)
    assert await a.client.upload_result(job.id, ok) == hashlib.sha256(ok).hexdigest()


def platform_max(platform: Platform) -> int:
    return 256 * 1024  # app_config fixture's max_result_bytes


async def test_drop_mid_upload_stores_nothing(platform: Platform) -> None:
    a = await platform.activate("dropper")
    job_id = platform.storage.add_job("dropper", ["127.0.0.1"], "22", "builtin", None, time.time())
    assert await a.client.next_job(wait=5) is not None
    body = b"partial-result" * 1000
    digest = hashlib.sha256(body).hexdigest().encode()
    await raw_exchange(
        platform,
        appliance_ctx(platform, a),
        b"POST /v1/jobs/%d/result HTTP/1.1\r\nhost: %s\r\nx-content-sha256: %s\r\n%s: %s\r\n"
        b"content-length: %d\r\n\r\n%s"
        % (
            job_id, HOSTNAME.encode(), digest, api.HEADER_SESSION.encode(), str(a.client.session).encode(),
            len(body), body[: len(body) // 2],
        ),
        hang_up=True,
    )
    await trio.sleep(0.3)
    assert platform.storage.result_count(job_id) == 0
    assert platform.storage.job(job_id).state == "leased"
    assert await a.client.upload_result(str(job_id), body) == digest.decode()


def test_wrapped_key_binds_the_appliance_row() -> None:
    kek = keys.new_key()
    vk = keys.new_key()
    wrapped = keys.wrap(kek, vk, 1, "a")
    assert bytes(keys.unwrap(kek, wrapped, 1, "a")) == vk
    for args in ((2, "a"), (1, "b")):
        with pytest.raises(keys.WrapError):
            keys.unwrap(kek, wrapped, *args)
    with pytest.raises(keys.WrapError):
        keys.unwrap(keys.new_key(), wrapped, 1, "a")


def test_sealed_volume_key_is_not_the_wrapped_key() -> None:
    priv, pub = sealing.generate_keypair()
    blob = sealing.seal(pub, b"k" * 32, api.SEAL_CONTEXT_VOLUME_KEY)
    assert b"k" * 32 not in blob
    assert sealing.open_sealed(priv, blob, api.SEAL_CONTEXT_VOLUME_KEY) == bytearray(b"k" * 32)
