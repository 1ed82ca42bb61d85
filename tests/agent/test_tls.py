"""TLS policy: pinned CA only, hostname checked, TLS >= 1.2, certificate times from the
platform-synced clock. Real TLS servers on 127.0.0.1: in-process trio ones and the platform."""

from __future__ import annotations

import datetime
import ssl
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import trio

from agent.exitcodes import EXIT_PLATFORM
from agent.timesync import Clock
from agent.tls import CertificateTimeError, client_context
from tests.agent.conftest import Pki, make_pki, run_agent_cli
from tools.demo import Platform, activate, start_platform

DAY = 86400.0


def server_ctx(pki: Pki, max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pki.cert_path), str(pki.key_path))
    if max_version is not None:
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = max_version
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the old-protocol server really try
    return ctx


async def handshake(server: ssl.SSLContext, client: ssl.SSLContext, hostname: str) -> None:
    """Run one handshake against a loopback server; raise what the client saw."""

    async def handler(stream: trio.SSLStream[trio.SocketStream]) -> None:
        try:
            await stream.do_handshake()
            await stream.send_all(b"hello")
        except trio.BrokenResourceError:
            pass

    failure: BaseException | None = None
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_ssl_over_tcp, handler, 0, server, host="127.0.0.1")
        )
        port = listeners[0].transport_listener.socket.getsockname()[1]
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        stream = trio.SSLStream(tcp, client, server_hostname=hostname)
        try:
            await stream.do_handshake()
            assert await stream.receive_some(5) == b"hello"
        except trio.BrokenResourceError as e:
            failure = e.__cause__ or e
        finally:
            await trio.aclose_forcefully(stream)
            nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure


def test_client_context_policy(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    ctx = client_context(pki.ca_pem, Clock())
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert len(ctx.get_ca_certs()) == 1  # the pinned CA, nothing from the system store


async def test_pinned_ca_and_hostname_accepted(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    await handshake(server_ctx(pki), client_context(pki.ca_pem, Clock()), "127.0.0.1")
    await handshake(server_ctx(pki), client_context(pki.ca_pem, Clock()), "localhost")


async def test_wrong_ca_refused(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "a")
    other = make_pki(tmp_path / "b")
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        await handshake(server_ctx(pki), client_context(other.ca_pem, Clock()), "127.0.0.1")


async def test_wrong_hostname_refused(tmp_path: Path) -> None:
    pki = make_pki(tmp_path, names=("platform.example",))
    with pytest.raises(ssl.SSLCertVerificationError, match=r"mismatch"):
        await handshake(server_ctx(pki), client_context(pki.ca_pem, Clock()), "127.0.0.1")


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
async def test_tls11_only_server_refused(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    client = client_context(pki.ca_pem, Clock())
    with pytest.raises(ssl.SSLError):
        await handshake(server_ctx(pki, ssl.TLSVersion.TLSv1_1), client, "127.0.0.1")
    # Control: the same server allowed up to TLS 1.2 is accepted.
    await handshake(server_ctx(pki, ssl.TLSVersion.TLSv1_2), client, "127.0.0.1")


@pytest.mark.parametrize(
    ("valid_from", "valid_to", "refused_offset", "accepted_offset"),
    [
        (2 * DAY, 3 * DAY, 0.0, 2.5 * DAY),  # our clock is behind: looks "not yet valid"
        (-3 * DAY, -2 * DAY, 0.0, -2.5 * DAY),  # our clock is ahead: looks "expired"
    ],
)
async def test_certificate_times_use_the_synced_clock(
    tmp_path: Path, valid_from: float, valid_to: float, refused_offset: float,
    accepted_offset: float,
) -> None:
    now = datetime.datetime.now(datetime.UTC)
    pki = make_pki(
        tmp_path,
        not_before=now + datetime.timedelta(seconds=valid_from),
        not_after=now + datetime.timedelta(seconds=valid_to),
    )
    with pytest.raises(CertificateTimeError):
        await handshake(
            server_ctx(pki), client_context(pki.ca_pem, Clock(offset=refused_offset)), "127.0.0.1"
        )
    await handshake(
        server_ctx(pki), client_context(pki.ca_pem, Clock(offset=accepted_offset)), "127.0.0.1"
    )


# --- the same refusals end to end, against the real platform --------------------------------


def test_activation_refuses_wrong_ca(platform: Platform, tmp_path: Path) -> None:
    other = make_pki(tmp_path / "other")
    code = platform.cli("appliance", "add", "app1").stdout.decode().strip()
    r = run_agent_cli("activate", str(tmp_path / "st"), "--platform", platform.url,
                      "--ca", str(other.ca_path), "--code", code, "--keystore", "file")
    assert r.returncode == EXIT_PLATFORM
    assert len(r.stderr.strip().splitlines()) == 1 and "certificate verification failed" in r.stderr
    assert code not in r.stderr
    assert not (tmp_path / "st").exists() or not any((tmp_path / "st").iterdir())


def test_activation_refuses_wrong_hostname(
    platform_factory: Callable[..., Platform], tmp_path: Path,
) -> None:
    plat = platform_factory(hostname="platform.example")
    code = plat.cli("appliance", "add", "app1").stdout.decode().strip()
    url = f"https://127.0.0.1:{plat.port}"  # reachable, but not the name on the certificate
    r = run_agent_cli("activate", str(tmp_path / "st"), "--platform", url,
                      "--ca", str(plat.ca), "--code", code, "--keystore", "file")
    assert r.returncode == EXIT_PLATFORM and "mismatch" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_activation_refuses_bad_code(platform: Platform, tmp_path: Path) -> None:
    r = run_agent_cli("activate", str(tmp_path / "st"), "--platform", platform.url,
                      "--ca", str(platform.ca), "--code", "NOT-A-CODE", "--keystore", "file")
    assert r.returncode == 23 and len(r.stderr.strip().splitlines()) == 1


def test_run_refuses_an_impersonated_platform(tmp_path: Path) -> None:
    """Same address, same hostname, another CA: the bound state refuses to talk to it."""
    real = start_platform(tmp_path / "real")
    try:
        activate(real, "app1", tmp_path / "st")
    finally:
        real.stop()
    fake = start_platform(tmp_path / "fake", port=real.port)
    try:
        r = run_agent_cli("run", str(tmp_path / "st"), "--once", "--poll-wait", "1")
    finally:
        fake.stop()
    assert r.returncode == EXIT_PLATFORM, r.stderr
    assert "certificate verification failed" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "st" / "volume.img").exists()  # nothing unlocked, nothing made
