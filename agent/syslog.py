"""Forwarding scan logs to a remote syslog: RFC 5424 messages over TLS, RFC 5425 framing.

``emit()`` never blocks and never does I/O: it formats the record and appends it to a
bounded in-memory buffer. One trio task drains the buffer over a TLS connection
(``agent.tls`` policy: TLS >= 1.2, the CA the platform named, hostname checked) and
reconnects with capped exponential backoff. When the buffer is full, new messages are
dropped and counted; after the next successful (re)connect the forwarder sends one notice
saying how many were dropped. So a syslog outage can lose log lines but never slows or
stops scanning.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import ssl
import threading
from datetime import UTC, datetime
from typing import Final

import trio

from agent.timesync import Clock
from agent.tls import client_context
from protocol.proxy import ProxyConfig, ProxyError, open_stream

log = logging.getLogger("agent.syslog")

FACILITY_LOCAL0: Final = 16
_SEVERITY: Final = {
    logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7,
}  # fmt: skip
_NOT_PRINTUSASCII = re.compile(r"[^\x21-\x7e]")
BOM: Final = b"\xef\xbb\xbf"
MAX_MESSAGE: Final = 8192  # octets of one message; RFC 5425 receivers must accept 2048+


def _field(value: str, limit: int) -> str:
    """An RFC 5424 header field: PRINTUSASCII only, at most *limit* chars, "-" if empty."""
    cleaned = _NOT_PRINTUSASCII.sub("_", value)[:limit]
    return cleaned or "-"


def format_rfc5424(
    severity: int,
    timestamp: float,
    hostname: str,
    app_name: str,
    procid: int,
    msgid: str,
    message: str,
    facility: int = FACILITY_LOCAL0,
) -> bytes:
    """One RFC 5424 message (no structured data; MSG as UTF-8 with BOM). Pure."""
    stamp = datetime.fromtimestamp(timestamp, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    header = (
        f"<{facility * 8 + severity}>1 {stamp} {_field(hostname, 255)} "
        f"{_field(app_name, 48)} {procid} {_field(msgid, 32)} -"
    )
    msg = header.encode("ascii") + b" " + BOM + message.encode("utf-8", errors="replace")
    return msg[:MAX_MESSAGE]


def frame_octet_counting(message: bytes) -> bytes:
    """RFC 5425 §4.3 framing: ``MSG-LEN SP SYSLOG-MSG``. Pure."""
    return str(len(message)).encode("ascii") + b" " + message


def parse_octet_counted(data: bytes) -> tuple[list[bytes], bytes]:
    """Split a stream of octet-counted frames into messages and the incomplete rest. Pure."""
    out: list[bytes] = []
    while True:
        sp = data.find(b" ")
        if sp <= 0:
            return out, data
        length = int(data[:sp])
        if len(data) < sp + 1 + length:
            return out, data
        out.append(data[sp + 1 : sp + 1 + length])
        data = data[sp + 1 + length :]


class SyslogForwarder:
    """A bounded, non-blocking RFC 5425 forwarder; run ``run()`` in a nursery."""

    def __init__(
        self,
        host: str,
        port: int,
        ca_pem: bytes,
        clock: Clock,
        hostname: str,
        app_name: str = "scanner-agent",
        capacity: int = 1000,
        connect_timeout: float = 10.0,
        max_backoff: float = 30.0,
        proxy: ProxyConfig | None = None,
    ) -> None:
        self.host = host
        self.proxy = proxy  # the appliance's CONNECT proxy: TLS runs inside its tunnel
        self.port = port
        self.clock = clock
        self.hostname = hostname
        self.app_name = app_name
        self.capacity = capacity
        self.connect_timeout = connect_timeout
        self.max_backoff = max_backoff
        self._ctx: ssl.SSLContext = client_context(ca_pem, clock)
        self._buffer: collections.deque[bytes] = collections.deque()
        self._lock = threading.Lock()
        self._token: trio.lowlevel.TrioToken | None = None
        self._wakeup = trio.Event()
        self.sent = 0
        self.dropped = 0
        self._dropped_reported = 0
        self.connected = False

    def __repr__(self) -> str:
        return f"<SyslogForwarder {self.host}:{self.port} sent={self.sent} dropped={self.dropped}>"

    # -- producer side (any thread, never blocks) --

    def submit(self, severity: int, msgid: str, message: str) -> None:
        """Queue one message; drop (and count) it when the buffer is full."""
        data = format_rfc5424(
            severity, self.clock.now(), self.hostname, self.app_name, os.getpid(), msgid, message
        )
        with self._lock:
            if len(self._buffer) >= self.capacity:
                self.dropped += 1
                return
            self._buffer.append(data)
        token = self._token
        if token is not None:
            try:
                token.run_sync_soon(self._wakeup.set)
            except trio.RunFinishedError:
                pass

    def pending(self) -> int:
        """Messages waiting in the buffer."""
        with self._lock:
            return len(self._buffer)

    def handler(self, level: int = logging.INFO) -> logging.Handler:
        """A logging handler that feeds this forwarder."""
        return _ForwardingHandler(self, level)

    # -- consumer side (one trio task) --

    def _take(self) -> list[bytes]:
        with self._lock:
            batch = list(self._buffer)
            self._buffer.clear()
        notice_due = self.dropped - self._dropped_reported
        if notice_due:
            self._dropped_reported = self.dropped
            batch.insert(
                0,
                format_rfc5424(
                    4, self.clock.now(), self.hostname, self.app_name, os.getpid(), "syslog",
                    f"event=syslog_dropped count={notice_due} total={self.dropped}",
                ),
            )
        return batch

    def _requeue(self, batch: list[bytes]) -> None:
        with self._lock:
            room = self.capacity - len(self._buffer)
            keep = batch[:room] if room > 0 else []
            self.dropped += len(batch) - len(keep)
            self._buffer.extendleft(reversed(keep))

    async def _connect(self) -> trio.SSLStream[trio.SocketStream]:
        with trio.fail_after(self.connect_timeout):
            tcp = await open_stream(self.proxy, self.host, self.port)
            stream = trio.SSLStream(tcp, self._ctx, server_hostname=self.host)
            try:
                await stream.do_handshake()
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
        return stream

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Drain the buffer forever (until cancelled), reconnecting with backoff."""
        self._token = trio.lowlevel.current_trio_token()
        task_status.started()
        backoff = 0.5
        while True:
            try:
                stream = await self._connect()
            except (OSError, trio.BrokenResourceError, trio.TooSlowError) as e:
                self.connected = False
                log.warning(
                    "event=syslog_connect_failed target=%s:%d error=%s retry_in=%.1f",
                    self.host, self.port, _why(e), backoff,
                )
                await trio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)
                continue
            self.connected = True
            backoff = 0.5
            log.info("event=syslog_connected target=%s:%d", self.host, self.port)
            try:
                await self._pump(stream)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
                log.warning("event=syslog_connection_lost error=%s", type(e).__name__)
            finally:
                self.connected = False
                await trio.aclose_forcefully(stream)

    async def _pump(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        while True:
            self._wakeup = trio.Event()
            batch = self._take()
            if not batch:
                await self._wakeup.wait()
                continue
            try:
                await stream.send_all(b"".join(frame_octet_counting(m) for m in batch))
            except BaseException:
                self._requeue(batch)
                raise
            self.sent += len(batch)

    async def flush(self, timeout: float) -> bool:
        """Wait up to *timeout* seconds for the buffer to drain; True if it did."""
        with trio.move_on_after(timeout):
            while self.pending():
                await trio.sleep(0.05)
            return True
        return False


def _why(e: BaseException) -> str:
    # A proxy's refusal is worth reading (status, which proxy); its message holds no secret.
    text = str(e).replace(" ", "_")[:120] if isinstance(e, ProxyError) else ""
    return text or type(e).__name__


class _ForwardingHandler(logging.Handler):
    def __init__(self, forwarder: SyslogForwarder, level: int) -> None:
        super().__init__(level)
        self.forwarder = forwarder

    def emit(self, record: logging.LogRecord) -> None:
        try:
            severity = _SEVERITY.get(record.levelno, 5)
            self.forwarder.submit(severity, record.name.rsplit(".", 1)[-1], record.getMessage())
        except Exception:  # noqa: BLE001 - logging must never raise into the scan
            self.handleError(record)
