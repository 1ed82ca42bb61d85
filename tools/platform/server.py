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

import logging
import os
import resource
import secrets
import signal
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from protocol import api, http1
from tools.platform import db, health, state
from tools.platform.handlers import AppConfig, Database, PlatformApp
from tools.platform.http import (
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


@dataclass(frozen=True)
class ServerLimits:
    """Connection-level limits: every resource a client can hold has a bound here.

    Connections without a client certificate (time, activation) get their own small
    budget so that they can never starve the appliances: ``max_anonymous`` connections
    at once, of which at most ``max_anonymous_bodies`` may be reading a request body
    (an activation), one request each. Connections with a verified certificate live in
    the large pool (``max_connections``), which is sized for every appliance
    long-polling at once, and are kept alive between requests.
    """

    handshake_timeout: float = 10.0
    header_timeout: float = 10.0  # request line + headers, whole
    idle_timeout: float = 30.0  # max silence while reading a body
    body_timeout: float = 10.0  # whole body: this ...
    min_body_rate: float = 16 * 1024.0  # ... plus its declared length at this many bytes/s
    keepalive_timeout: float = 75.0  # silence allowed between requests (mTLS only)
    max_requests_per_connection: int = 10_000
    max_connections: int = 4096  # every connection, in any phase
    max_per_source: int = 64  # connections from one IP address
    max_anonymous: int = 64  # connections past the handshake without a client certificate
    max_anonymous_bodies: int = 8  # of those, reading a request body at once

    def deadlines(self) -> Deadlines:
        """The per-request time bounds for the HTTP layer."""
        return Deadlines(self.header_timeout, self.idle_timeout, self.body_timeout, self.min_body_rate)


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


class Server:
    """Accepts connections; one request on anonymous ones, keep-alive on mutual-TLS ones."""

    def __init__(self, app: PlatformApp, ctx: ssl.SSLContext, limits: ServerLimits | None = None) -> None:
        self.app = app
        self.ctx = ctx
        self.limits = limits or ServerLimits()
        self._slots = trio.Semaphore(self.limits.max_connections)
        self._anonymous = trio.Semaphore(self.limits.max_anonymous)
        self._anonymous_bodies = trio.Semaphore(self.limits.max_anonymous_bodies)
        self._per_source: dict[str, int] = {}

    def source_counts(self) -> dict[str, int]:
        """Open connections per source address (for tests and diagnostics)."""
        return dict(self._per_source)

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
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.app.run_background)
            for listener in listeners:
                nursery.start_soon(self._accept_loop, listener, nursery)
            task_status.started((str(bound[0]), int(bound[1])))

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        async with listener:
            while True:
                await self._slots.acquire()
                try:
                    tcp = await listener.accept()
                except OSError as e:
                    self._slots.release()
                    log.warning("event=accept_failed error=%s", type(e).__name__)
                    await trio.sleep(0.1)
                    continue
                nursery.start_soon(self._connection, tcp)

    async def _connection(self, tcp: trio.SocketStream) -> None:
        try:
            peer = tcp.socket.getpeername()
            source, peer_s = str(peer[0]), f"{peer[0]}:{peer[1]}"
        except OSError:
            source = peer_s = "?"
        count = self._per_source.get(source, 0)
        if count >= self.limits.max_per_source:
            # Refused before TLS: one source cannot hold more than its share of slots.
            log.info("event=connection_refused peer=%s reason=per_source_cap cap=%d", peer_s, count)
            await trio.aclose_forcefully(tcp)
            self._slots.release()
            return
        self._per_source[source] = count + 1
        stream = trio.SSLStream(tcp, self.ctx, server_side=True, https_compatible=True)
        try:
            await self._handle(stream, peer_s)
        finally:
            with trio.move_on_after(2) as scope:
                scope.shield = True
                try:
                    await stream.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            if scope.cancelled_caught:
                await trio.aclose_forcefully(stream)
            left = self._per_source[source] - 1
            if left:
                self._per_source[source] = left
            else:
                del self._per_source[source]
            self._slots.release()

    async def _handle(self, stream: trio.SSLStream[trio.SocketStream], peer: str) -> None:
        try:
            with trio.fail_after(self.limits.handshake_timeout):
                await http1.tls_handshake(stream)
        except (http1.StreamBroken, trio.TooSlowError) as e:
            tls_error = e.tls_error if isinstance(e, http1.StreamBroken) else None
            why = (tls_error.reason if tls_error is not None else None) or type(tls_error or e).__name__
            log.info("event=tls_handshake_failed peer=%s error=%s", peer, why)
            await _flush_alert(stream)
            return
        peer_der = stream.getpeercert(binary_form=True)
        hc = HttpConnection(stream, self.limits.deadlines())
        if peer_der is None:
            try:
                self._anonymous.acquire_nowait()
            except trio.WouldBlock:
                log.info("event=connection_refused peer=%s reason=anonymous_budget", peer)
                return
            released = False

            def release() -> None:
                nonlocal released
                if not released:
                    released = True
                    self._anonymous.release()

            try:
                await self._exchange(hc, peer, None, self._anonymous_bodies, may_keep=False, answered=release)
            finally:
                release()
            return
        # Mutual TLS: keep the connection for the appliance's next poll, progress or upload.
        while True:
            may_keep = hc.requests + 1 < self.limits.max_requests_per_connection
            if not await self._exchange(hc, peer, peer_der, None, may_keep=may_keep):
                return
            hc.next_cycle()
            try:
                await hc.wait_for_request(self.limits.keepalive_timeout)
            except (IdleClose, ClientGone):
                return

    async def _exchange(
        self,
        hc: HttpConnection,
        peer: str,
        peer_der: bytes | None,
        body_gate: trio.Semaphore | None,
        *,
        may_keep: bool,
        answered: Callable[[], None] | None = None,
    ) -> bool:
        """Serve one request; True if the connection may carry another one.

        *answered* is called once the response is sent, before the drain: the anonymous
        budget bounds requests in progress, and a burst of refused slowloris connections
        draining (and closing) must not keep legitimate time requests out.
        """
        ex = Exchange(hc, body_gate=body_gate)
        started = time.monotonic()
        status = 0
        keep = False
        try:
            try:
                await ex.read_head()
                resp = await self.app.handle(ex, peer_der)
            except HttpError as err:
                resp = error_response(err)
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
                    await ex.drain(max_bytes=4 * 1024 * 1024, timeout=2.0 if peer_der else 0.25)
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
    _raise_fd_limit(limits.max_connections + 256)
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


def _raise_fd_limit(wanted: int) -> None:
    """Raise the soft open-file limit towards *wanted* (Debian's default soft limit, 1024,
    is below the connection pool; the hard limit is the ceiling we may reach alone)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        log.info("event=fd_limit_raised soft=%d", target)
