"""The one check that uses a credential: an authenticated HTTP banner (Basic auth).

The credential is ``user:password`` bytes in a bytearray. It is encoded into a request
buffer that is also a bytearray, sent, and both buffers are overwritten before this module
returns, whatever happened. Nothing here logs, raises or returns credential bytes.
"""

from __future__ import annotations

import socket

import trio

from agent.scan.model import AUTH_ACCEPTED, AUTH_FAILED, AUTH_REJECTED
from agent.scan.services import clean_banner, http_status
from scratchfs.keyholder.wipe import wipe

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


def basic_auth_request(host: str, credential: bytearray) -> bytearray:
    """A GET request carrying the credential; the caller must wipe() the returned buffer."""
    req = bytearray(b"GET / HTTP/1.0\r\nHost: ")
    req += host.encode("ascii", "replace")
    req += b"\r\nUser-Agent: scanner-agent\r\nAuthorization: Basic "
    b64_into(credential, req)
    req += b"\r\nConnection: close\r\n\r\n"
    return req


async def _read_some(stream: trio.SocketStream, limit: int) -> bytes:
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
    address: str, port: int, credential: bytearray, timeout: float
) -> tuple[str, str]:
    """Try the credential on http://address:port/; return (auth outcome, banner seen).

    The banner is the status line plus the first line of the body, which for an accepted
    login is what the protected service shows its users.
    """
    request = basic_auth_request(address, credential)
    try:
        with trio.move_on_after(timeout) as scope:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            sock = trio.socket.socket(family, socket.SOCK_STREAM)
            stream = trio.SocketStream(sock)
            async with stream:
                await sock.connect((address, port))
                await stream.send_all(request)
                wipe(request)
                raw = await _read_some(stream, 4096)
        if scope.cancelled_caught:
            return AUTH_FAILED, "timed out"
    except OSError as e:
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
