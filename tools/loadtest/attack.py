"""A many-source attack on a platform node, run as its own process (loopback only).

What issue 24 measured, as one bounded run:

- idle handshakes: ``--idle-per-source`` TCP connections from each of ``--idle-sources``
  loopback addresses that never send a byte, each reopened 0.1 s after the platform drops
  it; with ``--stalled-hellos`` half of them send a real ClientHello first and then stall
  (the platform answers it and waits). With ``--spread`` every address is in its own /24
  (127.1.k.1: a botnet, which per-prefix caps cannot stop); without, they are 127.0.0.2
  upwards (one /24);
- slow heads: ``--slow-heads`` TLS connections from ``--slow-source`` sending a request
  head one header line per second;
- slow activation bodies: ``--slow-bodies`` TLS connections from the same address sending
  ``POST /v1/activate`` declaring 4000 bytes, then one byte per second.

Every connection is reopened when the platform closes it, until ``--seconds`` pass. The
attacker runs in its own process so that its work does not slow the server or the
measured clients in theirs. It prints one JSON line of counts when it ends (SIGTERM or
time up). Only 127.0.0.0/8 targets are accepted. Exit codes: 0 done, 2 usage error.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import resource
import signal
import ssl
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import trio

ACTIVATE = "/v1/activate"


def idle_source(k: int, spread: bool) -> str:
    """The *k*-th idle-handshake source address."""
    return f"127.1.{k % 256}.{1 + k // 256}" if spread else f"127.0.{k // 250}.{2 + k % 250}"


class Attack:
    """The attack's tasks and what they saw."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.seen: Counter[str] = Counter()
        ctx = ssl.create_default_context(cafile=args.ca)
        ctx.check_hostname = False  # the attacker does not care who answers
        self.ctx = ctx

    async def _open(self, source: str) -> trio.SocketStream:
        sock = trio.socket.socket()
        try:
            await sock.bind((source, 0))
            await sock.connect((self.args.host, self.args.port))
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(sock)

    async def _forever(self, what: str, one: Callable[[], Awaitable[None]]) -> None:
        while True:
            try:
                await one()
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                self.seen[f"{what}: dropped"] += 1
            await trio.sleep(0.1)

    async def idle(self, source: str, hello: bool) -> None:
        what = "stalled hello" if hello else "idle"

        async def one() -> None:
            s = await self._open(source)
            self.seen[f"{what}: opened"] += 1
            try:
                if hello:
                    await s.send_all(self._client_hello())
                while await s.receive_some(4096):
                    pass
                self.seen[f"{what}: closed by platform"] += 1
            finally:
                await trio.aclose_forcefully(s)

        await self._forever(what, one)

    def _client_hello(self) -> bytes:
        # A real ClientHello from an in-memory TLS client that will never read the answer:
        # the platform answers and then waits, inside its handshake, for a Finished that
        # never comes (silent connections alone are kept out by TCP_DEFER_ACCEPT).
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = self.ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        return outgoing.read()

    async def _tls(self) -> trio.SSLStream[trio.SocketStream]:
        s = trio.SSLStream(await self._open(self.args.slow_source), self.ctx, server_hostname="localhost")
        try:
            await s.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(s)
            raise
        return s

    async def _trickle(self, what: str, first: bytes, next_piece: Callable[[int], bytes]) -> None:
        async def one() -> None:
            s = await self._tls()
            self.seen[f"{what}: connected"] += 1
            try:
                await s.send_all(first)
                for i in range(10_000):
                    with trio.move_on_after(1.0):
                        answer = await s.receive_some(4096)
                        status = answer[9:12].decode("ascii", "replace") if answer else "closed"
                        self.seen[f"{what}: {status}"] += 1
                        return
                    await s.send_all(next_piece(i))
            finally:
                await trio.aclose_forcefully(s)

        await self._forever(what, one)

    async def slow_head(self) -> None:
        await self._trickle("slow head", b"GET /v1/time HTTP/1.1\r\n", lambda i: f"x-slow-{i}: 1\r\n".encode())

    async def slow_body(self) -> None:
        head = (
            f"POST {ACTIVATE} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
            "content-length: 4000\r\n\r\n{"
        ).encode()
        await self._trickle("slow body", head, lambda i: b" ")

    async def run(self) -> None:
        a = self.args
        with trio.move_on_after(a.seconds), trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_on_signal, signals, nursery.cancel_scope)
                for _ in range(a.slow_heads):
                    nursery.start_soon(self.slow_head)
                for _ in range(a.slow_bodies):
                    nursery.start_soon(self.slow_body)
                total = a.idle_sources * a.idle_per_source
                for n in range(a.idle_per_source):
                    for k in range(a.idle_sources):
                        hello = a.stalled_hellos and n % 2 == 1
                        nursery.start_soon(self.idle, idle_source(k, a.spread), hello)
                    # Opened over ~2 s: thousands of SYNs at once would only overflow the
                    # kernel's queues, which measures the kernel, not the platform.
                    await trio.sleep(2.0 * a.idle_sources / max(1, total))


async def _cancel_on_signal(signals: AsyncIterator[int], scope: trio.CancelScope) -> None:
    async for _ in signals:
        scope.cancel()
        return


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.loadtest.attack", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca", type=Path, required=True, help="the platform CA certificate (PEM)")
    p.add_argument("--idle-sources", type=int, default=100)
    p.add_argument("--idle-per-source", type=int, default=4)
    p.add_argument("--spread", action="store_true", help="each idle source in its own /24")
    p.add_argument("--stalled-hellos", action="store_true", help="half the idle ones stall after a ClientHello")
    p.add_argument("--slow-source", default="127.0.9.1")
    p.add_argument("--slow-heads", type=int, default=16)
    p.add_argument("--slow-bodies", type=int, default=16)
    p.add_argument("--seconds", type=float, default=60.0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not ipaddress.ip_address(args.host).is_loopback or not ipaddress.ip_address(args.slow_source).is_loopback:
        print("attack: only loopback targets and sources (127.0.0.0/8)", file=sys.stderr)
        return 2
    if not 0 <= args.idle_sources <= 256 * 250 or not 0 < args.seconds <= 3600:
        print("attack: --idle-sources 0-64000, --seconds 0-3600", file=sys.stderr)
        return 2
    # One fd per connection: --idle-sources x --idle-per-source may be thousands.
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    attack = Attack(args)
    trio.run(attack.run)
    print(json.dumps(dict(attack.seen), sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
