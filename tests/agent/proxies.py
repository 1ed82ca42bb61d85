"""Proxies for the agent's tests: a real tinyproxy (Debian) and a TLS-intercepting proxy.

Both listen on loopback high ports, write their own config/log in the test's temp dir, and
are stopped by PID (tinyproxy) or by closing their socket and joining their thread.
"""

from __future__ import annotations

import re
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.agent.conftest import Pki, make_pki
from tools.children import stop_child


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (tinyproxy cannot bind port 0 and report it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Tinyproxy:
    """A running ``tinyproxy -d`` with its own config and log file."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    outgoing: str  # the source address of its upstream connections (its "Bind")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def connects(self) -> list[str]:
        """Every ``host:port`` it was asked to CONNECT to, in order (from its log)."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return re.findall(r"Request \(file descriptor \d+\): CONNECT (\S+) HTTP/1\.[01]", text)

    def stop(self) -> None:
        """SIGTERM by PID, SIGKILL if it lingers."""
        stop_child(self.proc)


def start_tinyproxy(directory: Path, credentials: tuple[str, str] | None = None,
                    outgoing: str = "127.0.0.3") -> Tinyproxy:
    """tinyproxy on 127.0.0.1:<free port>, upstream connections from *outgoing*.

    Binding its upstream side to its own loopback address lets a test tell, from the
    platform's log, whether a request came through the proxy or straight from the agent.
    """
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = directory / "tinyproxy.log"
    conf = directory / "tinyproxy.conf"
    lines = [
        f"Port {port}", "Listen 127.0.0.1", f"Bind {outgoing}", "Timeout 60",
        f'LogFile "{log}"', "LogLevel Connect", f'PidFile "{directory / "tinyproxy.pid"}"',
        "MaxClients 32", "Allow 127.0.0.1",
    ]
    if credentials is not None:
        lines.append(f"BasicAuth {credentials[0]} {credentials[1]}")
    conf.write_text("\n".join(lines) + "\n")
    conf.chmod(0o600)
    proc = subprocess.Popen(["tinyproxy", "-d", "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=open(directory / "tinyproxy.err", "wb"))
    deadline = time.monotonic() + 20
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError("tinyproxy did not start: " + (directory / "tinyproxy.err").read_text())
        time.sleep(0.05)
    return Tinyproxy(proc, port, log, outgoing)


@dataclass
class InterceptingProxy:
    """Accepts CONNECT, says 200, then answers the TLS handshake with its own certificate
    (valid for the platform's name, issued by its own CA): what a TLS-inspecting proxy does."""

    sock: socket.socket
    pki: Pki
    port: int = 0
    connects: list[str] = field(default_factory=list)
    handshake_errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _handle(self, conn: socket.socket, ctx: ssl.SSLContext) -> None:
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 16384:
            chunk = conn.recv(4096)
            if not chunk:
                return
            head += chunk
        self.connects.append(head.split(b"\r\n", 1)[0].decode(errors="replace"))
        conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        try:
            with ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError) as e:
            self.handshake_errors.append(type(e).__name__)

    def _loop(self) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.pki.cert_path, self.pki.key_path)
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    self._handle(conn, ctx)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        if self._thread is not None:
            self._thread.join(timeout=5)


def start_intercepting_proxy(directory: Path, names: tuple[str, ...] = ("127.0.0.1", "localhost")
                             ) -> InterceptingProxy:
    """An intercepting proxy on 127.0.0.1 presenting a certificate for *names*."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    proxy = InterceptingProxy(s, make_pki(directory, names), s.getsockname()[1])
    proxy._thread = threading.Thread(target=proxy._loop, daemon=True)
    proxy._thread.start()
    return proxy


def remote_endpoints(pids: set[int], inodes: set[str]) -> set[tuple[str, int]]:
    """(remote IPv4 address, port) of the TCP sockets with these inodes (from /proc/net/tcp)."""
    out: set[tuple[str, int]] = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/net/tcp") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[9] in inodes and cols[3] != "0A":
                addr, port = cols[2].split(":")
                ip = ".".join(str(int(addr[i : i + 2], 16)) for i in (6, 4, 2, 0))
                out.add((ip, int(port, 16)))
        break  # every process shares the network namespace: one table is enough
    return out
