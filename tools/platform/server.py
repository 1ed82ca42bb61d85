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
import signal
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from tools.platform import db, health, state
from tools.platform.handlers import AppConfig, Database, PlatformApp
from tools.platform.http import ClientGone, Exchange, HttpError, error_response

log = logging.getLogger("scanner-platform")


@dataclass(frozen=True)
class ServerLimits:
    """Connection-level limits."""

    handshake_timeout: float = 10.0
    header_timeout: float = 10.0
    idle_timeout: float = 30.0  # max silence while reading a body
    max_connections: int = 256


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
    """Accepts connections and runs one exchange per connection."""

    def __init__(self, app: PlatformApp, ctx: ssl.SSLContext, limits: ServerLimits | None = None) -> None:
        self.app = app
        self.ctx = ctx
        self.limits = limits or ServerLimits()
        self._slots = trio.Semaphore(self.limits.max_connections)

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
                    log.warning("accept failed error=%s", type(e).__name__)
                    await trio.sleep(0.1)
                    continue
                nursery.start_soon(self._connection, tcp)

    async def _connection(self, tcp: trio.SocketStream) -> None:
        try:
            peer = tcp.socket.getpeername()
            peer_s = f"{peer[0]}:{peer[1]}"
        except OSError:
            peer_s = "?"
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
            self._slots.release()

    async def _handle(self, stream: trio.SSLStream[trio.SocketStream], peer: str) -> None:
        try:
            with trio.fail_after(self.limits.handshake_timeout):
                await stream.do_handshake()
        except (trio.BrokenResourceError, trio.TooSlowError) as e:
            cause = e.__cause__
            why = getattr(cause, "reason", None) or type(cause or e).__name__
            log.info("tls handshake failed peer=%s error=%s", peer, why)
            await _flush_alert(stream)
            return
        peer_der = stream.getpeercert(binary_form=True)
        ex = Exchange(stream, self.limits.header_timeout, self.limits.idle_timeout)
        started = time.monotonic()
        status = 0
        try:
            try:
                await ex.read_head()
                resp = await self.app.handle(ex, peer_der)
            except HttpError as err:
                resp = error_response(err)
            status = resp.status
            if ex.can_respond():
                await ex.respond(resp)
                await ex.drain(max_bytes=4 * 1024 * 1024, timeout=2.0)
        except ClientGone:
            status = 499  # nginx's "client closed request"; nothing was stored
        except Exception:  # one request's bug must not take the server down
            log.exception("request failed peer=%s path=%s", peer, ex.path)
            status = 500
            if ex.can_respond():
                try:
                    await ex.respond(error_response(HttpError(500, "internal", "internal error")))
                except ClientGone:
                    pass
        log.info(
            "request peer=%s method=%s path=%s status=%d ms=%d",
            peer,
            ex.method or "-",
            ex.path or "-",
            status,
            int((time.monotonic() - started) * 1000),
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


def build_app(paths: state.StatePaths, config: AppConfig) -> tuple[PlatformApp, db.Storage]:
    """Load CA, KEK and database of a state dir into an app."""
    state.check_initialised(paths)
    authority = state.load_ca(paths)
    kek = state.load_kek(paths)
    storage = db.Storage(paths.db)
    return PlatformApp(Database(storage), authority, kek, config), storage


async def run_server(
    paths: state.StatePaths,
    host: str,
    port: int,
    config: AppConfig,
    limits: ServerLimits | None = None,
    *,
    announce: bool = True,
) -> None:
    """Serve until SIGTERM/SIGINT; write STATE_DIR/serve.addr and print the bound address."""
    app, storage = build_app(paths, config)
    ctx = server_context(paths)
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
