"""Outbound HTTP CONNECT proxy (RFC 9110 §9.3.6), optionally with Basic credentials.

Enterprise networks often let appliances out only through an HTTP proxy. The appliance asks
the proxy for a raw TCP tunnel to the platform (or the syslog target) and then runs its own
TLS inside that tunnel, with the same pinned CA, hostname check and client certificate as a
direct connection: the proxy relays ciphertext and learns only the destination host:port.
A proxy that intercepts TLS (answers the handshake with its own certificate) fails the
appliance's certificate check exactly like any other foreign server.

The proxy's credentials are an appliance secret: they are sent only in the
``Proxy-Authorization`` header of the CONNECT request and never appear in a repr, a log
line or an exception message.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import urlsplit

import trio

MAX_RESPONSE_HEAD: Final = 16 * 1024  # bytes of the proxy's answer to CONNECT we accept
_RECV: Final = 4096


class ProxyError(OSError):
    """The proxy could not be reached or refused the tunnel (no secret in the message).

    An OSError, so that code which already treats a failed ``connect()`` as "network down,
    retry later" treats a failed tunnel the same way.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class ProxyConfig:
    """Where the proxy is, and its Basic credentials (``b"user:password"``) if it needs any."""

    host: str
    port: int
    # A bytearray when it comes from the keystore, so that the agent can wipe it at exit.
    credentials: bytes | bytearray | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` (never with credentials: safe to log and to store)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @classmethod
    def parse(cls, url: str, credentials: bytes | bytearray | None = None) -> ProxyConfig:
        """Validate ``http://HOST:PORT``; raise ValueError (the message never echoes secrets)."""
        parts = urlsplit(url)
        if parts.username is not None or parts.password is not None:
            # Do not echo the URL: it holds a password.
            raise ValueError("the proxy URL must not contain credentials")
        if parts.scheme != "http":
            raise ValueError(f"the proxy URL must start with http:// (got {url!r})")
        if not parts.hostname:
            raise ValueError(f"the proxy URL has no host (got {url!r})")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"the proxy URL must be http://HOST:PORT only (got {url!r})")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"the proxy URL has an invalid port (got {url!r})") from None
        if port is None:
            raise ValueError(f"the proxy URL needs an explicit port (got {url!r})")
        if credentials is not None:
            check_credentials(credentials)
        return cls(host=parts.hostname, port=port, credentials=credentials)


def check_credentials(credentials: bytes | bytearray) -> None:
    """``user:password`` in printable ASCII without CR/LF; raise ValueError (no echo)."""
    user, sep, _password = credentials.partition(b":")
    if not sep or not user:
        raise ValueError("proxy credentials must look like user:password")
    if any(b < 0x20 or b > 0x7E for b in credentials):
        raise ValueError("proxy credentials must be printable ASCII on one line")


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def connect_request(host: str, port: int, credentials: bytes | bytearray | None) -> bytearray:
    """The CONNECT request head (a bytearray, so the caller can wipe the credentials). Pure."""
    authority = _authority(host, port).encode("ascii")
    head = bytearray(b"CONNECT " + authority + b" HTTP/1.1\r\nHost: " + authority + b"\r\n")
    if credentials is not None:
        token = bytearray(base64.b64encode(credentials))
        head += b"Proxy-Authorization: Basic " + token + b"\r\n"
        token[:] = bytes(len(token))
    head += b"\r\n"
    return head


def parse_connect_response(head: bytes) -> tuple[int, str]:
    """(status, reason phrase) of the proxy's response head; raise ProxyError. Pure."""
    line = head.split(b"\r\n", 1)[0].decode("latin-1")
    version, _, rest = line.partition(" ")
    code, _, phrase = rest.partition(" ")
    if not version.startswith("HTTP/1.") or not code.isdigit() or len(code) != 3:
        raise ProxyError("the proxy answered CONNECT with something that is not HTTP")
    return int(code), "".join(ch if ch.isprintable() else "?" for ch in phrase[:80])


async def open_tunnel(proxy: ProxyConfig, host: str, port: int) -> trio.SocketStream:
    """A TCP stream to *host*:*port* through *proxy* (CONNECT); raise ProxyError.

    Bound the call with the caller's own timeout (``trio.fail_after``).
    """
    try:
        tcp = await trio.open_tcp_stream(proxy.host, proxy.port)
    except OSError as e:
        raise ProxyError(
            f"cannot connect to proxy {proxy.url}: {e.strerror or type(e).__name__}"
        ) from None
    try:
        request = connect_request(host, port, proxy.credentials)
        try:
            await tcp.send_all(request)
        finally:
            request[:] = bytes(len(request))
        data = b""
        while b"\r\n\r\n" not in data:
            if len(data) > MAX_RESPONSE_HEAD:
                raise ProxyError(f"proxy {proxy.url} sent an oversized answer to CONNECT")
            chunk = await tcp.receive_some(_RECV)
            if not chunk:
                raise ProxyError(f"proxy {proxy.url} closed the connection during CONNECT")
            data += chunk
        head, _, extra = data.partition(b"\r\n\r\n")
        status, phrase = parse_connect_response(head)
        target = _authority(host, port)
        if status != 200:
            raise ProxyError(
                f"proxy {proxy.url} refused the tunnel to {target}: {status} {phrase}", status
            )
        if extra:
            # The TLS client speaks first: a proxy that sends bytes before our ClientHello
            # is not a plain tunnel.
            raise ProxyError(f"proxy {proxy.url} sent data before the tunnel to {target} opened")
    except trio.BrokenResourceError:
        await trio.aclose_forcefully(tcp)
        raise ProxyError(f"proxy {proxy.url} broke the connection during CONNECT") from None
    except BaseException:
        await trio.aclose_forcefully(tcp)
        raise
    return tcp


async def open_stream(proxy: ProxyConfig | None, host: str, port: int) -> trio.SocketStream:
    """TCP to *host*:*port*: through *proxy* when one is configured (then never directly)."""
    if proxy is not None:
        return await open_tunnel(proxy, host, port)
    return await trio.open_tcp_stream(host, port)
