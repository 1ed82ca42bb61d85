"""HTTP/1.1 over a trio stream with h11: the one adapter the platform server and the
appliance client share.

h11 is a pure protocol state machine (bytes in, events out); this module is the I/O half
beside it, as h11's ``examples/trio-server.py`` wrapper is (its docstring notes the same
wrapper could serve clients) and as hypercorn keeps its protocol apart from its I/O. It
knows nothing about the platform's endpoints, status codes or errors: it moves bytes
between a trio stream and an `h11.Connection`, counts them, and turns transport failures
into one exception, `StreamBroken`, that tells whether TLS was the cause. Each side maps
that to its own vocabulary once (the server: the client went away; the client: a TLS or
an availability error). Time bounds are the callers' (their deadlines differ).
"""

from __future__ import annotations

import ssl
from typing import Any, Final

import h11
import trio

from protocol import api

RECEIVE_BYTES: Final = 64 * 1024  # one receive_some; also the chunk a body is sent in


class StreamBroken(Exception):
    """The transport failed: reset, closed under us, or a TLS error or alert.

    ``tls_error`` is the OpenSSL error behind it, when there is one (a refused certificate,
    a protocol version, an alert the peer sent); None for a plain reset or close.
    """

    def __init__(self, tls_error: ssl.SSLError | None) -> None:
        super().__init__(tls_error.reason if tls_error is not None and tls_error.reason else "stream broken")
        self.tls_error = tls_error


class PeerProtocolError(Exception):
    """The peer sent bytes that are not HTTP/1.1 (or too large a head); ``status_hint`` is
    h11's suggestion for the status a server answers with."""

    def __init__(self, status_hint: int) -> None:
        super().__init__("malformed HTTP")
        self.status_hint = status_hint


def ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    """The `ssl.SSLError` in *exc*'s cause/context chain (trio wraps it), or None."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _broken(exc: BaseException) -> StreamBroken:
    return StreamBroken(ssl_cause(exc))


async def tls_handshake(stream: trio.SSLStream[Any]) -> None:
    """Complete the TLS handshake on *stream* (StreamBroken if it fails; the caller bounds time)."""
    try:
        await stream.do_handshake()
    except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
        raise _broken(e) from None


class Http1Stream:
    """One connection: a trio stream and the h11 state machine of our *role* on it.

    Reused across requests when both sides finished an exchange cleanly (keep-alive).
    ``received`` counts the bytes read since the current exchange started (a client uses
    it to tell "the server closed an idle connection" from "the answer broke midway").
    """

    def __init__(self, stream: trio.abc.Stream, role: type[h11.CLIENT] | type[h11.SERVER]) -> None:
        self.stream = stream
        self.h11 = h11.Connection(role, max_incomplete_event_size=api.MAX_HEADER_BYTES)
        self.received = 0

    def next_event(self) -> Any:
        """h11's next event (h11.NEED_DATA when more bytes are needed); PeerProtocolError."""
        try:
            return self.h11.next_event()
        except h11.RemoteProtocolError as e:
            raise PeerProtocolError(e.error_status_hint) from None

    async def receive(self) -> bytes:
        """Read what the peer sent next and hand it to h11; b"" at end of stream (h11 is
        told too, so its next event is ConnectionClosed). StreamBroken on failure."""
        try:
            data = bytes(await self.stream.receive_some(RECEIVE_BYTES))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            raise _broken(e) from None
        self.received += len(data)
        self.h11.receive_data(data)
        return data

    async def send(self, event: Any) -> None:
        """Serialise *event* and write it out (StreamBroken on failure)."""
        data = self.h11.send(event)
        if data:
            await self.send_raw(data)

    async def send_raw(self, data: bytes) -> None:
        """Write bytes h11 already produced (StreamBroken on failure)."""
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            raise _broken(e) from None

    async def send_body(self, body: bytes) -> None:
        """Send *body* as Data events of RECEIVE_BYTES, then EndOfMessage."""
        view = memoryview(body)
        for off in range(0, len(body), RECEIVE_BYTES):
            await self.send(h11.Data(data=bytes(view[off : off + RECEIVE_BYTES])))
        await self.send(h11.EndOfMessage())

    def reusable(self) -> bool:
        """True if both sides finished the last exchange cleanly and may start another."""
        return self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE

    def start_next_cycle(self) -> None:
        """Reset h11 (and the byte count) for the next exchange on this connection."""
        self.h11.start_next_cycle()
        self.received = 0

    async def discard_incoming(self, max_bytes: int, timeout: float) -> None:
        """Read and drop what the peer still sends, up to *max_bytes* or *timeout*: closing
        a socket with unread bytes resets it, which can destroy a response sent early."""
        got = 0
        with trio.move_on_after(timeout):
            while got < max_bytes:
                try:
                    data = await self.stream.receive_some(RECEIVE_BYTES)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                if not data:
                    return
                got += len(data)

    async def aclose_forcefully(self) -> None:
        """Close the transport at once (no TLS close_notify wait)."""
        await trio.aclose_forcefully(self.stream)
