"""The built-in engine: a trio TCP connect scanner with banner grabbing.

Each probe connects with a timeout (refused = closed, timeout/unreachable = filtered), then
waits passively for a banner (SSH, FTP, SMTP... speak first); if the service stays silent,
it sends a minimal HTTP HEAD and reads the answer. A CapacityLimiter bounds the number of
connections in flight. Sockets are only ever connected, never bound or listening.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Awaitable, Callable

import trio

from agent.scan.credcheck import http_basic_check
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
from scratchfs.keyholder.wipe import wipe

log = logging.getLogger("agent.scan")

# Returns the credential in a fresh bytearray, or None when the job has none. Called at
# most once per scan, only when a port actually asks for authentication.
CredentialSource = Callable[[], Awaitable[bytearray | None]]

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
    banner = clean_banner(raw)
    service, how = guess_service(port, banner)
    return PortResult(
        port, STATE_OPEN, service, banner, how, needs_auth=http_status(raw) == 401
    )


async def scan(
    addresses: list[Address],
    ports: list[int],
    opts: ScanOptions,
    credential: CredentialSource | None = None,
) -> list[HostResult]:
    """Probe every (address, port); then run the credential check where a port asks for it."""
    hosts = [HostResult(a.target, a.address) for a in addresses]
    limiter = trio.CapacityLimiter(opts.concurrency)

    async def one(host: HostResult, port: int) -> None:
        async with limiter:
            host.ports.append(await probe(host.address, port, opts))

    async with trio.open_nursery() as nursery:
        for host in hosts:
            for port in ports:
                nursery.start_soon(one, host, port)

    needing = [(h, pr) for h in hosts for pr in h.ports if pr.needs_auth]
    if needing and credential is not None:
        secret = await credential()
        if secret is not None:
            try:
                for host, result in needing:
                    timeout = opts.connect_timeout + opts.banner_timeout
                    result.auth, result.auth_banner = await http_basic_check(
                        host.address, result.port, secret, timeout
                    )
                    log.info(
                        "event=credential_check address=%s port=%d outcome=%s",
                        host.address, result.port, result.auth,
                    )
            finally:
                wipe(secret)
    return hosts
