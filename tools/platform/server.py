"""The HTTPS server: trio TCP listener, `trio.SSLStream` (mutual TLS), one h11 exchange each.

Why not an ASGI server: hypercorn and uvicorn do not pass the client certificate to the
application (the ASGI TLS extension is unimplemented, hypercorn issue #62), and the platform
must know which appliance calls from the verified certificate itself. With SSLStream the
peer certificate is available right after the handshake, so the handler gets it directly.

The server context uses ``CERT_OPTIONAL``: the activation and time endpoints must work
before an appliance has a certificate, so the certificate is enforced per endpoint. A
certificate that is presented is always verified against the platform CA by OpenSSL (a
certificate from another CA fails the handshake).
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import trio

from protocol import api, http1
from tools.platform import bounds, db, health, state, tuning
from tools.platform.handlers import AppConfig, Database, PlatformApp
from tools.platform.http import (
    BodyGate,
    ClientGone,
    Deadlines,
    Exchange,
    HttpConnection,
    HttpError,
    IdleClose,
    Response,
    error_response,
    json_response,
)

log = logging.getLogger("scanner-platform")

# Give freed heap back to the system once this many connections closed since the peak.
_TRIM_AFTER_DROP: Final = 512
# An interval with this many failed connections is a flood (memory is given back after it).
_FLOOD_FAILURES: Final = 256
# Connections accepted per wake-up of the accept loop at most.
_ACCEPT_BATCH: Final = 256
# The kernel defers a silent connection for at most this long (TCP_DEFER_ACCEPT, seconds).
_MAX_DEFER: Final = 1.0


@dataclass(frozen=True)
class ServerLimits:
    """Connection-level limits: every resource a client can hold has a bound here.

    Phases and their budgets (see docs/platform.md, "Serving under attack"):

    - TCP accepted: ``max_connections`` in all (accept waits beyond), ``max_per_prefix``
      from one network prefix and ``max_per_source`` from one address (refused before TLS).
    - TLS handshake: a small room of ``max_handshakes`` seats, ``max_handshakes_per_prefix``
      per prefix, ``handshake_timeout`` each; a newcomer to a full room evicts an older
      handshake (see `bounds.HandshakeRoom`) instead of waiting behind silent ones.
    - Past the handshake without a usable client certificate (none; or one that is
      revoked, deactivated or not on record): ``max_anonymous`` connections, of which
      ``max_anonymous_bodies`` may be reading a body (an activation), each prefix at most
      its ``*_per_prefix`` share; one request each, a head within
      ``anonymous_header_timeout`` and a body of at most ``max_anonymous_body`` bytes.
    - With a verified certificate on record: the large pool, kept alive between requests.

    Prefixes are /``ipv4_prefix`` and /``ipv6_prefix`` (an IPv6 host holds a /64).
    """

    handshake_timeout: float = 5.0
    header_timeout: float = 10.0  # request line + headers, whole
    anonymous_header_timeout: float = 3.0  # the same without a usable client certificate
    idle_timeout: float = 30.0  # max silence while reading a body
    body_timeout: float = 10.0  # whole body: this ...
    min_body_rate: float = 16 * 1024.0  # ... plus its declared length at this many bytes/s
    keepalive_timeout: float = 75.0  # silence allowed between requests (mTLS only)
    max_requests_per_connection: int = 10_000
    max_connections: int = 4096  # every connection, in any phase
    max_per_prefix: int = 256  # connections from one network prefix, any phase
    max_per_source: int = 64  # connections from one IP address, any phase
    max_handshakes: int = 256  # connections in the TLS handshake
    max_handshakes_per_prefix: int = 32
    max_anonymous: int = 64  # connections past the handshake without a usable certificate
    max_anonymous_per_prefix: int = 16
    max_anonymous_bodies: int = 8  # of those, reading a request body at once
    max_anonymous_bodies_per_prefix: int = 4
    max_anonymous_body: int = 8 * 1024  # an activation is ~3 KiB (CSR + hybrid key)
    ipv4_prefix: int = 24
    ipv6_prefix: int = 64
    log_interval: float = 10.0  # connection failures are summed up once per interval

    def deadlines(self, *, anonymous: bool = False) -> Deadlines:
        """The per-request time bounds for the HTTP layer."""
        head = min(self.header_timeout, self.anonymous_header_timeout) if anonymous else self.header_timeout
        return Deadlines(head, self.idle_timeout, self.body_timeout, self.min_body_rate)


def limits_from_args(args: argparse.Namespace) -> ServerLimits:
    """The ServerLimits the `serve` flags ask for (`bounds.add_limit_flags`, which checks
    their ranges); flags not given keep the defaults."""
    given = {name: getattr(args, name) for name in bounds.LIMIT_FLAGS if getattr(args, name, None) is not None}
    return ServerLimits(**given)


def server_context(paths: state.StatePaths) -> ssl.SSLContext:
    """TLS 1.2+ server context: our certificate, client certificates optional but verified."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # Forward-secret AEAD suites only for TLS 1.2 (TLS 1.3 suites are all fine).
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    state.read_private(paths.server_key)  # refuse a world-readable key before using it
    ctx.load_cert_chain(paths.server_cert, paths.server_key)
    ctx.load_verify_locations(cafile=paths.ca_cert)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


class _HandshakeTicket:
    """A connection's seat in the handshake room: evicting it cancels the handshake."""

    def __init__(self, scope: trio.CancelScope) -> None:
        self.scope = scope
        self.evicted = False

    def cancel(self) -> None:
        self.evicted = True
        self.scope.cancel()


# 403 reasons that say the certificate itself is not acceptable: the connection is closed
# after the answer (another request on it could only get the same answer).
_CLOSING_REASONS: Final = frozenset({api.REASON_DEACTIVATED, api.REASON_UNKNOWN_CERTIFICATE})


class Server:
    """Accepts connections; one request on anonymous ones, keep-alive on mutual-TLS ones."""

    def __init__(self, app: PlatformApp, ctx: ssl.SSLContext, limits: ServerLimits | None = None) -> None:
        self.app = app
        self.ctx = ctx
        self.limits = limits = limits or ServerLimits()
        self._slots = trio.Semaphore(limits.max_connections)
        self._per_source: Counter[str] = Counter()
        self._per_prefix: Counter[str] = Counter()
        self._handshakes = bounds.HandshakeRoom(limits.max_handshakes, limits.max_handshakes_per_prefix)
        self._anonymous = bounds.Budget(limits.max_anonymous, limits.max_anonymous_per_prefix)
        self._anonymous_bodies = bounds.Budget(limits.max_anonymous_bodies, limits.max_anonymous_bodies_per_prefix)
        self._failures = bounds.FailureTally()
        self._deferred = False  # the kernel defers silent connections (TCP_DEFER_ACCEPT)
        self._open = 0
        self._peak_open = 0  # since memory was last given back (see _give_back_memory)
        self._flooded = False  # an interval of the current flood had many failures

    def source_counts(self) -> dict[str, int]:
        """Open connections per source address (for tests and diagnostics)."""
        return dict(self._per_source)

    def prefix_of(self, address: str) -> str:
        """The network prefix *address* is accounted under."""
        return bounds.prefix_of(address, self.limits.ipv4_prefix, self.limits.ipv6_prefix)

    def in_handshake(self) -> int:
        """Connections in the TLS handshake now (for tests and diagnostics)."""
        return len(self._handshakes)

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on host:port (0 = any free port); report the bound address when ready."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        await self.serve_on(listeners, task_status=task_status)

    async def serve_on(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve on already bound listeners; report the first one's address when ready."""
        bound = listeners[0].socket.getsockname()
        for listener in listeners:
            self._deferred = tuning.defer_accept(listener, min(self.limits.handshake_timeout, _MAX_DEFER))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.app.run_background)
            nursery.start_soon(self._every_interval)
            for listener in listeners:
                nursery.start_soon(self._accept_loop, listener, nursery)
            task_status.started((str(bound[0]), int(bound[1])))

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        # Accepts in batches: after one wake-up, everything the kernel has queued (up to
        # _ACCEPT_BATCH) is taken at once. trio's listener yields to the scheduler after
        # each accept, so a burst of attacker connections ahead of an appliance's in the
        # kernel's FIFO queue would cost it one scheduler round per attacker.
        with socket.socket(fileno=os.dup(listener.socket.fileno())) as sock:
            sock.setblocking(False)
            async with listener:
                holding = False  # a slot of max_connections for the next connection
                while True:
                    if not holding:
                        await self._slots.acquire()
                        holding = True
                    await trio.lowlevel.wait_readable(sock)
                    for _ in range(_ACCEPT_BATCH):
                        try:
                            conn, _addr = sock.accept()
                        except BlockingIOError:
                            break
                        except OSError as e:
                            log.warning("event=accept_failed error=%s", type(e).__name__)
                            await trio.sleep(0.1)
                            break
                        if self._deferred and self._under_pressure() and tuning.silent(conn):
                            # The kernel held this connection for the whole deferral and it
                            # still has not sent its ClientHello: under pressure that is a
                            # handshake timeout already; closed here, it costs no task and
                            # no TLS state (and keeps its slot for the next one).
                            self._failed("tls_handshake_failed", "-", "-", "silent")
                            conn.close()
                            continue
                        nursery.start_soon(self._connection, trio.SocketStream(trio.socket.from_stdlib_socket(conn)))
                        try:
                            self._slots.acquire_nowait()
                        except trio.WouldBlock:
                            holding = False
                            break

    def _under_pressure(self) -> bool:
        # An eighth of the handshake room in use: far more than appliances ever have in
        # flight at once (their handshakes take milliseconds), far less than a flood.
        return len(self._handshakes) >= max(1, self.limits.max_handshakes // 8)

    def _failed(self, event: str, peer: str, prefix: str, reason: str) -> None:
        """Count a connection that ended before HTTP; only the interval's first gets a line."""
        if self._failures.add(reason, prefix):
            log.info("event=%s peer=%s error=%s others=counted_in_interval_summary", event, peer, reason)

    async def _every_interval(self) -> None:
        """Once per log interval: one summary line of failed connections; give memory back
        after a flood."""
        while True:
            await trio.sleep(self.limits.log_interval)
            failed = self._failures.total()
            summary = self._failures.drain()
            if summary is not None:
                log.warning("event=connection_failures interval_s=%g %s", self.limits.log_interval, summary)
            self._give_back_memory(failed)

    def _give_back_memory(self, failed: int) -> None:
        # After a flood the connections' buffers are free again, but glibc keeps the freed
        # heap for reuse (many small chunks: nothing is unmapped by itself). malloc_trim
        # returns it once the flood is over: the open connections fell well below their
        # peak, or an interval with few failures follows one with many.
        if failed >= _FLOOD_FAILURES:
            self._flooded = True
        elif self._flooded or self._peak_open - self._open >= _TRIM_AFTER_DROP:
            trimmed = tuning.malloc_trim()
            log.info("event=memory_returned after=flood trimmed=%s open=%d", trimmed, self._open)
            self._flooded = False
            self._peak_open = self._open

    async def _connection(self, tcp: trio.SocketStream) -> None:
        try:
            peer = tcp.socket.getpeername()
            source, peer_s = str(peer[0]), f"{peer[0]}:{peer[1]}"
        except OSError:
            source = peer_s = "?"
        prefix = self.prefix_of(source)
        if (
            self._per_source[source] >= self.limits.max_per_source
            or self._per_prefix[prefix] >= self.limits.max_per_prefix
        ):
            # Refused before TLS: one source cannot hold more than its share of slots.
            cap = "per_source_cap" if self._per_source[source] >= self.limits.max_per_source else "per_prefix_cap"
            self._failed("connection_refused", peer_s, prefix, cap)
            await trio.aclose_forcefully(tcp)
            self._slots.release()
            return
        self._per_source[source] += 1
        self._per_prefix[prefix] += 1
        self._open += 1
        self._peak_open = max(self._peak_open, self._open)
        stream = trio.SSLStream(tcp, self.ctx, server_side=True, https_compatible=True)
        try:
            await self._handle(stream, peer_s, prefix)
        finally:
            with trio.move_on_after(2) as scope:
                scope.shield = True
                try:
                    await stream.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            if scope.cancelled_caught:
                await trio.aclose_forcefully(stream)
            self._open -= 1
            for counts, key in ((self._per_source, source), (self._per_prefix, prefix)):
                counts[key] -= 1
                if not counts[key]:
                    del counts[key]
            self._slots.release()

    async def _handshake(self, stream: trio.SSLStream[trio.SocketStream], peer: str, prefix: str) -> bool:
        """The TLS handshake, in the handshake room and within its deadline; True if done."""
        why = ""
        with trio.CancelScope(deadline=trio.current_time() + self.limits.handshake_timeout) as scope:
            ticket = _HandshakeTicket(scope)
            seat = self._handshakes.enter(prefix, ticket)
            try:
                await http1.tls_handshake(stream)
            except http1.StreamBroken as e:
                why = (e.tls_error.reason if e.tls_error is not None else None) or type(e.tls_error or e).__name__
            finally:
                self._handshakes.leave(prefix, seat)
        if scope.cancelled_caught:
            why = "evicted" if ticket.evicted else "timeout"
        if not why:
            return True
        self._failed("tls_handshake_failed", peer, prefix, why)
        await _flush_alert(stream)
        return False

    async def _usable_certificate(self, peer_der: bytes) -> bool:
        """False if the certificate is revoked, deactivated or not on record (asked once,
        right after the handshake, so that such a connection never joins the appliance pool)."""
        try:
            await self.app.identify(peer_der, required=False)
        except HttpError as err:
            return err.status != 403
        return True

    async def _handle(self, stream: trio.SSLStream[trio.SocketStream], peer: str, prefix: str) -> None:
        if not await self._handshake(stream, peer, prefix):
            return
        peer_der = stream.getpeercert(binary_form=True)
        if peer_der is None or not await self._usable_certificate(peer_der):
            # No certificate, or one we refuse: the small anonymous budget, one request. A
            # refused certificate still gets its answer (403 deactivated tells an appliance
            # to erase its keys), then the connection is closed.
            if not self._anonymous.try_take(prefix):
                self._failed("connection_refused", peer, prefix, "anonymous_budget")
                await self._refuse_busy(stream)
                return
            taken = True

            def release() -> None:
                nonlocal taken
                if taken:
                    taken = False
                    self._anonymous.give_back(prefix)

            try:
                hc = HttpConnection(stream, self.limits.deadlines(anonymous=True))
                await self._exchange(
                    hc,
                    peer,
                    peer_der,
                    self._anonymous_bodies.share(prefix),
                    may_keep=False,
                    answered=release,
                    max_body=self.limits.max_anonymous_body,
                )
            finally:
                release()
            return
        # Mutual TLS: keep the connection for the appliance's next poll, progress or upload.
        hc = HttpConnection(stream, self.limits.deadlines())
        while True:
            may_keep = hc.requests + 1 < self.limits.max_requests_per_connection
            if not await self._exchange(hc, peer, peer_der, None, may_keep=may_keep):
                return
            hc.next_cycle()
            try:
                await hc.wait_for_request(self.limits.keepalive_timeout)
            except (IdleClose, ClientGone):
                return

    async def _refuse_busy(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        """Answer 503 busy at once, without reading the request (its head could be slow),
        so that a client (an appliance activating beside many others of its site) retries
        after Retry-After instead of seeing a dropped connection; then a short drain."""
        hc = HttpConnection(stream, self.limits.deadlines(anonymous=True))
        busy = HttpError(
            503, api.REASON_BUSY, "too many unauthenticated connections; retry later", {"retry-after": "1"}
        )
        try:
            await Exchange(hc).respond(error_response(busy))
            await hc.http.discard_incoming(64 * 1024, 0.25)
        except ClientGone:
            pass

    async def _exchange(
        self,
        hc: HttpConnection,
        peer: str,
        peer_der: bytes | None,
        body_gate: BodyGate | None,
        *,
        may_keep: bool,
        answered: Callable[[], None] | None = None,
        max_body: int | None = None,
    ) -> bool:
        """Serve one request; True if the connection may carry another one.

        *answered* is called once the response is sent, before the drain: the anonymous
        budget bounds requests in progress, and a burst of refused slowloris connections
        draining (and closing) must not keep legitimate time requests out.
        """
        ex = Exchange(hc, body_gate=body_gate, max_body=max_body)
        started = time.monotonic()
        status = 0
        keep = False
        try:
            try:
                await ex.read_head()
                resp = await self.app.handle(ex, peer_der)
            except HttpError as err:
                resp = error_response(err)
                if err.status == 403 and err.reason in _CLOSING_REASONS:
                    may_keep = False
            finally:
                ex.release_gate()
            status = resp.status
            if ex.can_respond():
                # Only a request read to its end, answered without a server-side failure,
                # leaves the connection in a state we trust for the next request.
                keep = may_keep and ex.request_complete() and status not in (408, 500)
                await ex.respond(resp, keep_alive=keep)
                if answered is not None:
                    answered()
                keep = keep and hc.reusable()
                if not keep:
                    # Anonymous drains are short: they still hold a per-source and global slot.
                    await ex.drain(max_bytes=4 * 1024 * 1024, timeout=2.0 if may_keep else 0.25)
        except ClientGone:
            status = 499  # nginx's "client closed request"; nothing was stored
            keep = False
        except Exception:  # one request's bug must not take the server down
            incident = secrets.token_hex(8)
            log.exception("event=request_failed peer=%s path=%s incident=%s", peer, ex.path or "-", incident)
            status = 500
            keep = False
            if ex.can_respond():
                try:
                    await ex.respond(internal_error(incident))
                except ClientGone:
                    pass
        log.info(
            "event=request peer=%s method=%s path=%s status=%d ms=%d",
            peer,
            ex.method or "-",
            ex.path or "-",
            status,
            int((time.monotonic() - started) * 1000),
        )
        return keep


def internal_error(incident: str) -> Response:
    """The generic 500: no exception text, no path, only an id to find the log entry."""
    return json_response(
        500,
        {
            api.F_REASON: api.REASON_INTERNAL,
            api.F_ERROR: f"internal error; the operator can find incident {incident} in the platform log",
            api.F_INCIDENT: incident,
        },
    )


async def _flush_alert(stream: trio.SSLStream[trio.SocketStream]) -> None:
    """Send the TLS alert OpenSSL queued when the handshake failed.

    trio marks the stream broken without sending what is still in its outgoing memory BIO,
    so the peer would only see a bare EOF. With TLS 1.3 the client learns that its
    certificate was refused only from this alert (its own handshake already finished), so
    we write it out ourselves, best effort.
    """
    bio = getattr(stream, "_outgoing", None)
    if not isinstance(bio, ssl.MemoryBIO) or not bio.pending:
        return
    with trio.move_on_after(1):
        try:
            await stream.transport_stream.send_all(bio.read())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


def build_app(paths: state.StatePaths, config: AppConfig, pool_size: int = 16) -> tuple[PlatformApp, db.Storage]:
    """Load CA, KEK and database of a state dir into an app."""
    state.check_initialised(paths)
    authority = state.load_ca(paths)
    kek = state.load_kek(paths)
    storage = state.open_storage(paths, pool_size=pool_size)
    return PlatformApp(Database(storage), authority, kek, config), storage


async def run_server(
    paths: state.StatePaths,
    host: str,
    port: int,
    config: AppConfig,
    limits: ServerLimits | None = None,
    *,
    announce: bool = True,
    pool_size: int = 16,
) -> None:
    """Serve until SIGTERM/SIGINT; write STATE_DIR/serve.addr and print the bound address."""
    app, storage = build_app(paths, config, pool_size)
    ctx = server_context(paths)
    limits = limits or ServerLimits()
    tuning.raise_fd_limit(limits.max_connections + 256)
    server = Server(app, ctx, limits)
    try:
        # Bind before any nursery exists, so that "address in use" is a plain OSError.
        listeners = await trio.open_tcp_listeners(port, host=host)
        async with trio.open_nursery() as nursery:
            bound_host, bound_port = await nursery.start(server.serve_on, listeners)
            # Heartbeat states are evaluated here, on a timer, so that a silent appliance
            # is flagged (and the alert hook runs) without anyone looking at the list.
            await nursery.start(health.watch, app.db)
            addr = f"{bound_host}:{bound_port}"
            tmp = paths.addr.with_name(paths.addr.name + ".tmp")
            tmp.write_text(addr + "\n")
            os.replace(tmp, paths.addr)
            log.info(
                "serving addr=%s lease_seconds=%g max_result_bytes=%d",
                addr,
                config.lease_seconds,
                config.max_result_bytes,
            )
            if announce:
                print(f"listening on {addr}", flush=True)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("stopping signal=%s", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break
    finally:
        _remove(paths.addr)
        storage.close()


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
