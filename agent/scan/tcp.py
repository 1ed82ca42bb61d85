"""The built-in engine: a trio TCP connect scanner with banner grabbing.

Each probe connects with a timeout (refused = closed, timeout/unreachable = filtered), then
waits passively for a banner (SSH, FTP, SMTP... speak first); if the service stays silent,
it sends a minimal HTTP HEAD and reads the answer. A port that stays silent or answers
with a TLS alert is probed once more over TLS (certificate not verified: we only look, and
record its SHA-256 for the result and for pinning). A CapacityLimiter bounds the number of
connections in flight. Sockets are only ever connected, never bound or listening.
No probe carries a credential; credential checks run afterwards (agent.scan.credcheck).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import socket
import ssl

import trio

from agent.scan.credcheck import CredentialSource, run_checks, tls_client_context
from agent.scan.model import (
    STATE_CLOSED,
    STATE_FILTERED,
    STATE_OPEN,
    HostResult,
    PortResult,
    ScanOptions,
)
from agent.scan.services import clean_banner, guess_service, http_status
from agent.scan.targets import Address

log = logging.getLogger("agent.scan")

__all__ = ["CredentialSource", "probe", "scan"]

_CLOSED_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET}


async def _receive(stream: trio.SocketStream, timeout: float, limit: int = 1024) -> bytes:
    data = bytearray()
    with trio.move_on_after(timeout):
        while len(data) < limit:
            try:
                chunk = await stream.receive_some(limit - len(data))
            except (trio.BrokenResourceError, OSError):
                break
            if not chunk:
                break
            data += chunk
            if b"\n" in data and not data.startswith(b"HTTP/"):
                break  # one line of a line-based banner is enough
            if data.startswith(b"HTTP/") and b"\r\n\r\n" in data:
                break
    return bytes(data)


async def probe(address: str, port: int, opts: ScanOptions) -> PortResult:
    """Connect to address:port and grab a banner if it is open."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    stream = trio.SocketStream(sock)
    async with stream:
        with trio.move_on_after(opts.connect_timeout) as scope:
            try:
                await sock.connect((address, port))
            except OSError as e:
                state = STATE_CLOSED if e.errno in _CLOSED_ERRNOS else STATE_FILTERED
                return PortResult(port, state)
        if scope.cancelled_caught:
            return PortResult(port, STATE_FILTERED)
        raw = await _receive(stream, opts.banner_timeout)
        if not raw:
            host = f"[{address}]" if family == socket.AF_INET6 else address
            try:
                await stream.send_all(f"HEAD / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            except (trio.BrokenResourceError, OSError):
                pass
            else:
                raw = await _receive(stream, opts.banner_timeout)
    if not raw or raw[:1] == b"\x15":  # silent, or a TLS alert answering our cleartext HEAD
        tls_result = await _probe_tls(address, port, opts)
        if tls_result is not None:
            return tls_result
    banner = clean_banner(raw)
    service, how = guess_service(port, banner)
    return PortResult(
        port, STATE_OPEN, service, banner, how, needs_auth=http_status(raw) == 401
    )


async def _probe_tls(address: str, port: int, opts: ScanOptions) -> PortResult | None:
    """Handshake and send HEAD over TLS; None when the port does not speak TLS."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    tcp_stream = trio.SocketStream(sock)
    stream = trio.SSLStream(
        tcp_stream, tls_client_context(), server_hostname=None, https_compatible=True
    )
    try:
        with trio.move_on_after(opts.connect_timeout + opts.banner_timeout) as scope:
            await sock.connect((address, port))
            await stream.do_handshake()
            der = stream.getpeercert(binary_form=True) or b""
            host = f"[{address}]" if family == socket.AF_INET6 else address
            await stream.send_all(f"HEAD / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            raw = await _receive_tls(stream, opts.banner_timeout)
        if scope.cancelled_caught:
            return None
    except (OSError, trio.BrokenResourceError, ssl.SSLError):
        return None
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            try:
                await stream.aclose()
            except (trio.BrokenResourceError, OSError, ssl.SSLError):
                pass
    banner = clean_banner(raw)
    service = "https" if http_status(raw) is not None else "tls"
    return PortResult(
        port, STATE_OPEN, service, banner, "banner", needs_auth=http_status(raw) == 401,
        tls=True, cert_sha256=hashlib.sha256(der).hexdigest(),
    )  # fmt: skip


async def _receive_tls(stream: trio.SSLStream[trio.SocketStream], timeout: float) -> bytes:
    data = bytearray()
    with trio.move_on_after(timeout):
        while len(data) < 4096 and b"\r\n\r\n" not in data:
            try:
                chunk = await stream.receive_some(4096 - len(data))
            except (trio.BrokenResourceError, OSError, ssl.SSLError):
                break
            if not chunk:
                break
            data += chunk
    return bytes(data)


async def scan(
    addresses: list[Address],
    ports: list[int],
    opts: ScanOptions,
    credential: CredentialSource | None = None,
    time_offset: float = 0.0,
) -> list[HostResult]:
    """Probe every (address, port); then the credential checks the sealed scope allows."""
    hosts = [HostResult(a.target, a.address) for a in addresses]
    limiter = trio.CapacityLimiter(opts.concurrency)

    async def one(host: HostResult, port: int) -> None:
        async with limiter:
            host.ports.append(await probe(host.address, port, opts))

    async with trio.open_nursery() as nursery:
        for host in hosts:
            for port in ports:
                nursery.start_soon(one, host, port)

    if credential is not None:
        await run_checks(hosts, credential, opts, time_offset)
    return hosts
