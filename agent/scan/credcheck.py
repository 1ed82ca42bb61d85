"""Credential checks, and the enforcement point of the credential's sealed scope.

run_checks() is the only caller of the credential source. It opens the credential once
(the agent hands over the sealed plaintext: metadata with the customer's scope, then the
secret), and for every port that asks for authentication decides from the *sealed* scope,
per (address, port, protocol), before a single secret byte is written to a socket:

- outside the scope's targets (hostnames: the addresses they resolve to now), ports or
  protocols -> ``credential_out_of_scope``;
- past the scope's expiry -> ``credential_expired``;
- HTTP Basic on a cleartext port unless the scope allows cleartext and pins no TLS
  certificate (a pin always means TLS) -> ``credential_needs_tls``;
- TLS (or SSH) peer whose certificate (host key) SHA-256 is not among the scope's pins,
  checked on the very connection that would carry the secret -> ``credential_cert_mismatch``.

The job (written by the platform) only says where to scan; it cannot widen the scope.
The secret lives in bytearrays, every derived buffer is overwritten before return, and
nothing here logs, raises or returns secret bytes.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable

import trio

from agent.scan.model import AUTH_ACCEPTED, AUTH_FAILED, AUTH_REJECTED, HostResult, PortResult, ScanOptions
from agent.scan.services import clean_banner, http_status
from protocol import credential as credmod
from protocol import scope as scopemod
from scratchfs.keyholder.wipe import wipe

log = logging.getLogger("agent.scan")

# Returns the opened credential (protocol.credential plaintext) in a fresh bytearray, or
# None when it is unusable. Called at most once per scan, only when a port asks for it.
CredentialSource = Callable[[], Awaitable[bytearray | None]]

# A credential the agent could not hand over (does not open, v1 blob without a scope).
UNUSABLE = "credential_unusable"

_B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def b64_into(src: bytearray, out: bytearray) -> None:
    """Append standard base64 of *src* to *out* without an immutable copy of either."""
    for i in range(0, len(src), 3):
        chunk = src[i : i + 3]
        n = len(chunk)
        v = (chunk[0] << 16) | ((chunk[1] if n > 1 else 0) << 8) | (chunk[2] if n > 2 else 0)
        out.append(_B64[(v >> 18) & 63])
        out.append(_B64[(v >> 12) & 63])
        out.append(_B64[(v >> 6) & 63] if n > 1 else ord("="))
        out.append(_B64[v & 63] if n > 2 else ord("="))
        wipe(chunk)


def basic_auth_request(host: str, username: str, password: bytearray) -> bytearray:
    """A GET request carrying the credential; the caller must wipe() the returned buffer."""
    pair = bytearray(username.encode())
    pair += b":"
    pair += password
    req = bytearray(b"GET / HTTP/1.0\r\nHost: ")
    req += host.encode("ascii", "replace")
    req += b"\r\nUser-Agent: scanner-agent\r\nAuthorization: Basic "
    try:
        b64_into(pair, req)
    finally:
        wipe(pair)
    req += b"\r\nConnection: close\r\n\r\n"
    return req


def tls_client_context() -> ssl.SSLContext:
    """TLS for scanning: any certificate is accepted (targets are often self-signed);
    trust in the peer comes from the scope's SHA-256 pin, checked before sending."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


async def _read_some(stream: trio.abc.ReceiveStream, limit: int) -> bytes:
    data = bytearray()
    while len(data) < limit:
        chunk = await stream.receive_some(limit - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def _body_line(raw: bytes) -> str:
    _, sep, body = raw.partition(b"\r\n\r\n")
    return clean_banner(body) if sep else ""


async def http_basic_check(
    address: str,
    port: int,
    username: str,
    password: bytearray,
    timeout: float,
    tls: bool = False,
    pins: tuple[str, ...] = (),
) -> tuple[str, str]:
    """Try the credential on http(s)://address:port/; return (auth outcome, banner seen).

    Over TLS, the certificate of this very connection is checked against *pins* before the
    request is built. Without TLS a pin cannot be checked, so with *pins* nothing is even
    connected to (the scope check refuses this first; this is the last line). The banner
    is the status line plus the first line of the body, which for an accepted login is what
    the protected service shows its users.
    """
    if pins and not tls:
        return scopemod.NEEDS_TLS, "a pinned credential travels over TLS only"
    request = bytearray()
    raw = b""
    try:
        with trio.move_on_after(timeout) as scope:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            sock = trio.socket.socket(family, socket.SOCK_STREAM)
            stream: trio.abc.Stream = trio.SocketStream(sock)
            if tls:
                stream = trio.SSLStream(
                    stream, tls_client_context(), server_hostname=None, https_compatible=True
                )
            async with stream:
                await sock.connect((address, port))
                if isinstance(stream, trio.SSLStream):
                    await stream.do_handshake()
                    der = stream.getpeercert(binary_form=True) or b""
                    if not scopemod.pin_matches(hashlib.sha256(der).hexdigest(), pins):
                        return scopemod.CERT_MISMATCH, "certificate is not the pinned one"
                request = basic_auth_request(address, username, password)
                await stream.send_all(request)
                wipe(request)
                raw = await _read_some(stream, 4096)
        if scope.cancelled_caught:
            return AUTH_FAILED, "timed out"
    except (OSError, trio.BrokenResourceError, ssl.SSLError) as e:
        return AUTH_FAILED, f"connection failed ({type(e).__name__})"
    finally:
        wipe(request)
    status = http_status(raw)
    first = clean_banner(raw.split(b"\r\n", 1)[0])
    if status is not None and 200 <= status < 300:
        body = _body_line(raw)
        return AUTH_ACCEPTED, f"{first} | {body}" if body else first
    if status in (401, 403):
        return AUTH_REJECTED, first
    return AUTH_FAILED, first


def _protocol_of(port: PortResult) -> str | None:
    """Which credential protocol a port asks for, if any."""
    if port.needs_auth:
        return scopemod.PROTO_HTTP_BASIC
    if port.service == "ssh" and port.banner.startswith("SSH-"):
        return scopemod.PROTO_SSH
    return None


async def resolve_names(names: list[str], timeout: float) -> dict[str, set[str]]:
    """Every address each scope hostname resolves to now (unresolvable: empty set)."""
    out: dict[str, set[str]] = {}
    for name in names:
        out[name] = set()
        with trio.move_on_after(timeout):
            try:
                infos = await trio.socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
            except OSError:
                continue
            out[name] = {str(i[4][0]) for i in infos}
    return out


async def run_checks(
    hosts: list[HostResult], source: CredentialSource, opts: ScanOptions, time_offset: float
) -> None:
    """Use the credential where the sealed scope allows it; mark every other candidate."""
    candidates = [
        (h, pr, proto) for h in hosts for pr in h.ports if (proto := _protocol_of(pr)) is not None
    ]
    if not candidates:
        return
    opened = await source()
    if opened is None:
        for _, pr, _ in candidates:
            pr.auth = UNUSABLE
        return
    secret = bytearray()
    try:
        try:
            meta, secret = credmod.unpack(opened)
        except credmod.CredentialError as e:
            log.error("event=credential_unusable error=%s", e)
            for _, pr, _ in candidates:
                pr.auth = UNUSABLE
            return
        finally:
            wipe(opened)
        sc = meta.scope
        resolved = await resolve_names(sc.hostnames(), opts.resolve_timeout)
        timeout = opts.connect_timeout + opts.banner_timeout
        for host, pr, proto in candidates:
            reason = sc.decide(host.address, resolved, pr.port, proto, pr.tls, time.time() + time_offset)
            if reason is None and proto == scopemod.PROTO_HTTP_BASIC and meta.kind != credmod.KIND_PASSWORD:
                reason = scopemod.OUT_OF_SCOPE
            if reason is not None:
                pr.auth = reason
                log.warning(
                    "event=credential_refused address=%s port=%d protocol=%s reason=%s",
                    host.address, pr.port, proto, reason,
                )
                continue
            if proto == scopemod.PROTO_HTTP_BASIC:
                pr.auth, pr.auth_banner = await http_basic_check(
                    host.address, pr.port, meta.username, secret, timeout, pr.tls, sc.tls_sha256
                )
            else:
                from agent.scan import sshcheck  # paramiko is imported only when SSH is used

                outcome = await trio.to_thread.run_sync(
                    sshcheck.ssh_check, host.address, pr.port, meta.username, meta.kind,
                    secret, sc.ssh_sha256, max(timeout, 10.0),
                )  # fmt: skip
                pr.auth, pr.auth_banner, pr.inventory = outcome
            log.info(
                "event=credential_check address=%s port=%d protocol=%s outcome=%s",
                host.address, pr.port, proto, pr.auth,
            )
    finally:
        wipe(secret)
