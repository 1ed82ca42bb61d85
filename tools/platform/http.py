"""HTTP/1.1 requests on the platform's side: parsed, bounded in size, depth and time.

This layer knows nothing about the platform: it parses a request, exposes its body as a
bounded async iterator, and writes the response. The bytes-to-events plumbing (h11 over a
trio stream) is `protocol.http1`, shared with the appliance client. Errors a handler raises
as `HttpError` become JSON error documents ``{"reason": ..., "error": ...}``.

Time bounds (why each exists): a slowloris client sends a request a byte at a time to hold
a connection forever, and a per-read idle timeout alone never fires for it. So every
request has a whole-request deadline: ``header_timeout`` for the request line and headers,
then, once the body starts, ``body_timeout`` plus the body length at ``min_body_rate``
bytes per second (a 16 MiB result upload on a slow link gets longer than a 200-byte
activation). ``idle_timeout`` still bounds silence inside the body.

One `HttpConnection` carries several requests when the peer keeps the connection alive
(the server decides whether it may, see `server`); each request is one `Exchange`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any, Final, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

import h11
import trio

from protocol import api, http1

log = logging.getLogger("scanner-platform.http")

SERVER_HEADER: Final = "scratchfs-platform/1"


class HttpError(Exception):
    """An error answer: status, machine-readable reason, one-line message (no secrets)."""

    def __init__(self, status: int, reason: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.headers = dict(headers or {})


class ClientGone(Exception):
    """The client closed the connection or broke TLS before the request was complete."""


class IdleClose(Exception):
    """A kept-alive connection stayed silent past its idle limit: close it quietly."""


class BodyGate(Protocol):
    """A budget a request must hold while it reads its body (refuse at once when full)."""

    def try_take(self) -> bool: ...

    def give_back(self) -> None: ...


@dataclass
class Response:
    """A complete response. ``body`` None means no body (e.g. 204)."""

    status: int
    body: bytes | None = None
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Deadlines:
    """Per-request time bounds (seconds; rate in bytes per second)."""

    header_timeout: float = 10.0  # request line + headers, whole
    idle_timeout: float = 30.0  # longest silence inside a body
    body_timeout: float = 10.0  # whole body: this much ...
    min_body_rate: float = 16 * 1024.0  # ... plus its length at this rate


def json_response(status: int, doc: Mapping[str, Any]) -> Response:
    """A JSON response."""
    return Response(status, json.dumps(doc, separators=(",", ":")).encode())


def error_response(err: HttpError) -> Response:
    """The JSON error document for *err*."""
    resp = json_response(err.status, {api.F_REASON: err.reason, api.F_ERROR: str(err)})
    resp.headers.update(err.headers)
    return resp


def json_depth_exceeds(raw: bytes, limit: int) -> bool:
    """True if brackets in *raw* nest deeper than *limit* (strings are skipped).

    Python's json module recurses once per level, so a body of 100,000 '[' raises
    RecursionError inside the parser; we refuse such bodies before parsing them.
    """
    if raw.count(b"[") + raw.count(b"{") <= limit:  # cheap common case: cannot be too deep
        return False
    depth = 0
    in_string = False
    escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return True
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return False


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """*raw* as a JSON object of bounded depth; HttpError 400 otherwise."""
    if json_depth_exceeds(raw, api.MAX_JSON_DEPTH):
        raise HttpError(400, api.REASON_BAD_REQUEST, f"JSON nested deeper than {api.MAX_JSON_DEPTH} levels")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise HttpError(400, api.REASON_BAD_REQUEST, "body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise HttpError(400, api.REASON_BAD_REQUEST, "body must be a JSON object")
    return doc


class HttpConnection:
    """One TLS connection's HTTP state (`protocol.http1`), shared by its successive exchanges."""

    def __init__(self, stream: trio.abc.Stream, deadlines: Deadlines) -> None:
        self.http = http1.Http1Stream(stream, h11.SERVER)
        self.stream = stream
        self.deadlines = deadlines
        self.requests = 0

    def reusable(self) -> bool:
        """True if both sides finished the last exchange cleanly and may start another."""
        return self.http.reusable()

    def next_cycle(self) -> None:
        """Reset h11 for the next request on this connection."""
        self.http.start_next_cycle()

    async def wait_for_request(self, idle: float) -> None:
        """Wait up to *idle* seconds for the first byte of the next request (IdleClose)."""
        if self.http.h11.trailing_data[0]:
            return  # the client pipelined: the next request is already buffered
        with trio.move_on_after(idle):
            try:
                data = await self.http.receive()
            except http1.StreamBroken:
                raise ClientGone from None
            if not data:
                raise IdleClose
            return
        raise IdleClose


class Exchange:
    """One HTTP request/response on a connection (already past the TLS handshake)."""

    def __init__(
        self,
        conn: HttpConnection | trio.abc.Stream,
        deadlines: Deadlines | None = None,
        *,
        body_gate: BodyGate | None = None,
        max_body: int | None = None,
    ) -> None:
        if not isinstance(conn, HttpConnection):
            conn = HttpConnection(conn, deadlines or Deadlines())
        self._hc = conn
        self._http = conn.http
        self._conn = conn.http.h11
        self._limits = conn.deadlines
        self._deadline = math.inf  # trio time by which the current phase must finish
        # An unauthenticated request may read a body only while holding this budget.
        self._body_gate = body_gate
        self._gate_held = False
        # A cap over every handler's own body limit (anonymous requests: a few KiB).
        self._max_body = max_body
        self.method = ""
        self.target = ""
        self.path = ""
        self.query: dict[str, list[str]] = {}
        self.headers: dict[str, str] = {}
        self.body_started = False

    async def _fill(self, idle: float) -> None:
        remaining = self._deadline - trio.current_time()
        timeout = min(idle, remaining)
        try:
            if timeout <= 0:
                raise trio.TooSlowError
            with trio.fail_after(timeout):
                await self._http.receive()
        except trio.TooSlowError:
            raise HttpError(408, api.REASON_TIMEOUT, "request not received in time") from None
        except http1.StreamBroken:
            raise ClientGone from None

    def _next(self) -> Any:
        try:
            return self._http.next_event()
        except http1.PeerProtocolError as e:
            status = e.status_hint if 400 <= e.status_hint < 500 else 400
            reason = api.REASON_TOO_LARGE if status == 431 else api.REASON_BAD_REQUEST
            raise HttpError(status, reason, "malformed HTTP request") from None

    async def read_head(self) -> None:
        """Read the request line and headers (HttpError 400/408/431, or ClientGone)."""
        self._deadline = trio.current_time() + self._limits.header_timeout
        while True:
            event = self._next()
            if event is h11.NEED_DATA:
                await self._fill(self._limits.header_timeout)
                continue
            if isinstance(event, h11.Request):
                break
            if isinstance(event, h11.ConnectionClosed):
                raise ClientGone
            raise HttpError(400, api.REASON_BAD_REQUEST, "unexpected HTTP event")
        self._hc.requests += 1
        self.method = event.method.decode("ascii", "replace")
        self.target = event.target.decode("ascii", "replace")
        parts = urlsplit(self.target)
        self.path = unquote(parts.path)
        try:
            self.query = parse_qs(parts.query, keep_blank_values=True, max_num_fields=16)
        except ValueError:  # more than 16 fields: no endpoint takes that many
            raise HttpError(400, api.REASON_BAD_REQUEST, "too many query parameters") from None
        self.headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers}

    def declared_length(self) -> int | None:
        """The Content-Length header as an int (None if absent; h11 validated its syntax)."""
        value = self.headers.get("content-length")
        return int(value) if value is not None else None

    async def _enter_gate(self) -> None:
        if self._body_gate is None or self._gate_held:
            return
        # Refuse at once rather than queue: a queued request would hold a connection of
        # the anonymous budget, and slow bodies queueing behind slow bodies is exactly how
        # a slowloris fills it.
        if not self._body_gate.try_take():
            busy = "too many unauthenticated requests; retry later"
            raise HttpError(503, api.REASON_BUSY, busy, {"retry-after": "1"})
        self._gate_held = True

    def release_gate(self) -> None:
        """Give back the unauthenticated body budget (idempotent; the server calls it)."""
        if self._gate_held and self._body_gate is not None:
            self._gate_held = False
            self._body_gate.give_back()

    async def iter_body(self, limit: int) -> AsyncIterator[bytes]:
        """The request body in chunks; HttpError 413 past *limit* bytes, ClientGone on EOF."""
        if self._max_body is not None:
            limit = min(limit, self._max_body)
        length = self.declared_length()
        if length is not None and length > limit:
            raise HttpError(413, api.REASON_TOO_LARGE, f"body larger than {limit} bytes")
        await self._enter_gate()
        if self._conn.they_are_waiting_for_100_continue:
            await self._send(h11.InformationalResponse(status_code=100, headers=[]))
        self.body_started = True
        expected = length if length is not None else limit
        self._deadline = trio.current_time() + self._limits.body_timeout + expected / self._limits.min_body_rate
        size = 0
        while True:
            event = self._next()
            if event is h11.NEED_DATA:
                await self._fill(self._limits.idle_timeout)
                continue
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > limit:
                    raise HttpError(413, api.REASON_TOO_LARGE, f"body larger than {limit} bytes")
                yield bytes(event.data)
                continue
            if isinstance(event, h11.EndOfMessage):
                return
            # ConnectionClosed (EOF mid-body): the client dropped mid-upload.
            raise ClientGone

    async def read_body(self, limit: int) -> bytes:
        """The whole request body (at most *limit* bytes)."""
        chunks = [chunk async for chunk in self.iter_body(limit)]
        return b"".join(chunks)

    async def read_json(self, limit: int = api.MAX_JSON_BODY) -> dict[str, Any]:
        """The body parsed as a JSON object of bounded size and depth; HttpError 400 otherwise."""
        return parse_json_object(await self.read_body(limit))

    async def _send(self, event: Any) -> None:
        try:
            await self._http.send(event)
        except http1.StreamBroken:
            raise ClientGone from None

    def can_respond(self) -> bool:
        """True while a response can still be sent on this connection."""
        return self._conn.our_state in (h11.IDLE, h11.SEND_RESPONSE)

    def request_complete(self) -> bool:
        """True once the whole request (body included) has been read.

        A request without a body still owes h11 its EndOfMessage event: take it here if
        it is already buffered; a body the handler never read means False.
        """
        if self._conn.their_state is h11.SEND_BODY:
            try:
                event = self._next()
            except HttpError:
                return False
            if not isinstance(event, h11.EndOfMessage):
                return False
        return self._conn.their_state is h11.DONE

    async def respond(self, resp: Response, *, keep_alive: bool = False) -> None:
        """Send *resp*; unless *keep_alive*, mark the connection for closing."""
        headers = [
            ("server", SERVER_HEADER),
            ("date", formatdate(usegmt=True)),
            ("cache-control", "no-store"),
        ]
        if not keep_alive:
            headers.append(("connection", "close"))
        headers += list(resp.headers.items())
        if resp.body is not None:
            headers += [
                ("content-type", resp.content_type),
                ("content-length", str(len(resp.body))),
            ]
        await self._send(h11.Response(status_code=resp.status, headers=headers))
        if resp.body and self.method != "HEAD":
            await self._send(h11.Data(data=resp.body))
        await self._send(h11.EndOfMessage())

    async def drain(self, max_bytes: int, timeout: float) -> None:
        """Read and discard what the client still sends, so closing does not reset the
        connection before it has read our (early) error response."""
        if self._conn.their_state is not h11.SEND_BODY:
            return
        await self._http.discard_incoming(max_bytes, timeout)
