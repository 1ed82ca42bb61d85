"""HTTP/1.1 over a TLS stream with h11: one request and one response per connection.

This layer knows nothing about the platform: it parses one request, exposes its body as a
bounded async iterator, and writes one response. Errors a handler raises as `HttpError`
become JSON error documents ``{"reason": ..., "error": ...}``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any, Final
from urllib.parse import parse_qs, unquote, urlsplit

import h11
import trio

from protocol import api

log = logging.getLogger("scanner-platform.http")

_RECV: Final = 64 * 1024
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


@dataclass
class Response:
    """A complete response. ``body`` None means no body (e.g. 204)."""

    status: int
    body: bytes | None = None
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def json_response(status: int, doc: Mapping[str, Any]) -> Response:
    """A JSON response."""
    return Response(status, json.dumps(doc, separators=(",", ":")).encode())


def error_response(err: HttpError) -> Response:
    """The JSON error document for *err*."""
    resp = json_response(err.status, {api.F_REASON: err.reason, api.F_ERROR: str(err)})
    resp.headers.update(err.headers)
    return resp


class Exchange:
    """One HTTP request/response on a stream (already past the TLS handshake)."""

    def __init__(self, stream: trio.abc.Stream, header_timeout: float, idle_timeout: float) -> None:
        self._stream = stream
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=api.MAX_HEADER_BYTES)
        self._header_timeout = header_timeout
        self._idle_timeout = idle_timeout
        self.method = ""
        self.target = ""
        self.path = ""
        self.query: dict[str, list[str]] = {}
        self.headers: dict[str, str] = {}
        self.body_started = False

    async def _fill(self, timeout: float) -> None:
        try:
            with trio.fail_after(timeout):
                data = await self._stream.receive_some(_RECV)
        except trio.TooSlowError:
            raise HttpError(408, api.REASON_TIMEOUT, "request not received in time") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ClientGone from None
        self._conn.receive_data(bytes(data))

    def _next(self) -> Any:
        try:
            return self._conn.next_event()
        except h11.RemoteProtocolError as e:
            status = e.error_status_hint if 400 <= e.error_status_hint < 500 else 400
            reason = api.REASON_TOO_LARGE if status == 431 else api.REASON_BAD_REQUEST
            raise HttpError(status, reason, "malformed HTTP request") from None

    async def read_head(self) -> None:
        """Read the request line and headers (HttpError 400/408/431, or ClientGone)."""
        with trio.move_on_after(self._header_timeout) as scope:
            while True:
                event = self._next()
                if event is h11.NEED_DATA:
                    await self._fill(self._header_timeout)
                    continue
                if isinstance(event, h11.Request):
                    break
                if isinstance(event, h11.ConnectionClosed):
                    raise ClientGone
                raise HttpError(400, api.REASON_BAD_REQUEST, "unexpected HTTP event")
        if scope.cancelled_caught:
            raise HttpError(408, api.REASON_TIMEOUT, "request headers not received in time")
        self.method = event.method.decode("ascii", "replace")
        self.target = event.target.decode("ascii", "replace")
        parts = urlsplit(self.target)
        self.path = unquote(parts.path)
        self.query = parse_qs(parts.query, keep_blank_values=True)
        self.headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers}

    def declared_length(self) -> int | None:
        """The Content-Length header as an int (None if absent; h11 validated its syntax)."""
        value = self.headers.get("content-length")
        return int(value) if value is not None else None

    async def iter_body(self, limit: int) -> AsyncIterator[bytes]:
        """The request body in chunks; HttpError 413 past *limit* bytes, ClientGone on EOF."""
        length = self.declared_length()
        if length is not None and length > limit:
            raise HttpError(413, api.REASON_TOO_LARGE, f"body larger than {limit} bytes")
        if self._conn.they_are_waiting_for_100_continue:
            await self._send(h11.InformationalResponse(status_code=100, headers=[]))
        self.body_started = True
        size = 0
        while True:
            event = self._next()
            if event is h11.NEED_DATA:
                await self._fill(self._idle_timeout)
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
        """The body parsed as a JSON object; HttpError 400 otherwise."""
        raw = await self.read_body(limit)
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise HttpError(400, api.REASON_BAD_REQUEST, "body is not valid JSON") from None
        if not isinstance(doc, dict):
            raise HttpError(400, api.REASON_BAD_REQUEST, "body must be a JSON object")
        return doc

    async def _send(self, event: Any) -> None:
        try:
            data = self._conn.send(event)
            if data:
                await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ClientGone from None

    def can_respond(self) -> bool:
        """True while a response can still be sent on this connection."""
        return self._conn.our_state in (h11.IDLE, h11.SEND_RESPONSE)

    async def respond(self, resp: Response) -> None:
        """Send *resp* and mark the connection for closing."""
        headers = [
            ("server", SERVER_HEADER),
            ("date", formatdate(usegmt=True)),
            ("connection", "close"),
            ("cache-control", "no-store"),
        ]
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
        got = 0
        with trio.move_on_after(timeout):
            while got < max_bytes:
                try:
                    data = await self._stream.receive_some(_RECV)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                if not data:
                    return
                got += len(data)
