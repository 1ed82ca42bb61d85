"""Loopback scan targets for the demo and tests/agent: TCP services on 127.0.0.1 served by
threads (so they answer while the agent runs as a subprocess), each recording what it got.

A banner service (speaks first, like SSH or FTP), an HTTP Basic-auth login (optionally over
TLS) that records every byte it receives, and a port with nothing listening.
"""

from __future__ import annotations

import base64
import hmac
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Service:
    """A loopback TCP service on 127.0.0.1:port served by a thread."""

    name: str
    port: int
    sock: socket.socket
    thread: threading.Thread | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    connections: int = 0
    authorized: int = 0
    # Every byte the service received (after TLS decryption, where it speaks TLS): tests
    # and the demo grep it for secrets that must never arrive.
    received: bytearray = field(default_factory=bytearray)

    def close(self) -> None:
        """Stop accepting and join the thread."""
        self.stop.set()
        self.sock.close()
        if self.thread is not None:
            self.thread.join(timeout=5)


def _serve(svc: Service, handle: Callable[[socket.socket], None]) -> None:
    svc.sock.settimeout(0.2)
    while not svc.stop.is_set():
        try:
            conn, _ = svc.sock.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        svc.connections += 1
        with conn:
            conn.settimeout(3)
            try:
                handle(conn)
            except OSError:
                pass


def _listen(host: str = "127.0.0.1") -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, 0))
    s.listen(16)
    return s


def start_banner_service(name: str, banner: bytes) -> Service:
    """A service that speaks first (like SSH or FTP): sends *banner* and closes."""
    svc = Service(name, 0, _listen())
    svc.port = svc.sock.getsockname()[1]

    def handle(conn: socket.socket) -> None:
        conn.sendall(banner)

    svc.thread = threading.Thread(target=_serve, args=(svc, handle), daemon=True)
    svc.thread.start()
    return svc


def _read_request(conn: socket.socket, record: bytearray | None = None) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data and len(data) < 16384:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
        if record is not None:
            record += chunk
    return data


def start_http_auth_service(
    credential: bytes,
    realm: bytes,
    secret_page: bytes,
    host: str = "127.0.0.1",
    tls: ssl.SSLContext | None = None,
) -> Service:
    """HTTP/1.0 (over TLS with *tls*) with Basic auth: 401 without the credential
    (``user:password``), *secret_page* with it. Records every byte it receives."""
    svc = Service("https-auth" if tls else "http-auth", 0, _listen(host))
    svc.port = svc.sock.getsockname()[1]
    expected = b"Basic " + base64.b64encode(credential)

    def handle(raw_conn: socket.socket) -> None:
        conn = raw_conn
        if tls is not None:
            try:
                conn = tls.wrap_socket(raw_conn, server_side=True)
            except (ssl.SSLError, OSError):
                return  # a cleartext probe on the TLS port: nothing to serve
        request = _read_request(conn, svc.received)
        auth = b""
        for line in request.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == b"authorization":
                auth = value.strip()
        if auth and hmac.compare_digest(auth, expected):
            svc.authorized += 1
            body = secret_page + b"\r\n"
            conn.sendall(
                b"HTTP/1.0 200 OK\r\nServer: demo-httpd\r\nContent-Type: text/plain\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
            )
        else:
            conn.sendall(
                b"HTTP/1.0 401 Unauthorized\r\nServer: demo-httpd\r\n"
                b'WWW-Authenticate: Basic realm="' + realm + b'"\r\nContent-Length: 0\r\n\r\n'
            )

    svc.thread = threading.Thread(target=_serve, args=(svc, handle), daemon=True)
    svc.thread.start()
    return svc


def closed_port() -> int:
    """A loopback port with nothing listening (bound, then released)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port
