"""Who may hold what, per network prefix: the platform server's admission bookkeeping.

Pure logic (no sockets, no trio): the server asks these objects whether a connection from
a prefix may enter a phase, tells them when it leaves, and acts on their answer.

Why per prefix and not per address: one host owns a whole IPv6 /64 (2^64 addresses) and
an attacker with a /24 owns 256 IPv4 ones, so a cap per address caps nothing. A prefix
(/24 for IPv4, /64 for IPv6 by default) is the unit one party usually holds; each prefix
gets a small share of every budget, so no single one can hold a whole budget.

- `Budget`: a global count with a per-prefix share; full means "refuse now", never queue.
- `HandshakeRoom`: connections still in the TLS handshake. When it is full a newcomer is
  not refused (accepting would stall, and an attacker that fills the room with silent
  connections would shut everybody out); instead the oldest connection of the prefix that
  holds the most seats is evicted. Appliances, whose handshakes take milliseconds and come
  from prefixes with few connections in the room, get through a flood of idle handshakes.
- `FailureTally`: handshake failures counted per reason over a logging interval, so a flood
  writes one line per interval rather than one per failure.
"""

from __future__ import annotations

import argparse
import ipaddress
import itertools
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from tools.platform import cliargs

# The `serve` flags that set a `server.ServerLimits` field: field -> (kind, help). Kept here,
# with no import of the server, so that building the CLI parser stays cheap.
LIMIT_FLAGS: Final[dict[str, tuple[type, str]]] = {
    "max_connections": (int, "connections at once, in any phase (default 4096)"),
    "max_per_prefix": (int, "connections at once from one network prefix (default 256)"),
    "max_per_source": (int, "connections at once from one IP address (default 64)"),
    "max_handshakes": (int, "connections in the TLS handshake; beyond, an older one is evicted (default 256)"),
    "max_handshakes_per_prefix": (int, "of those, from one network prefix (default 32)"),
    "handshake_timeout": (float, "seconds a TLS handshake may take (default 5)"),
    "max_anonymous": (int, "connections at once without a usable client certificate (default 64)"),
    "max_anonymous_per_prefix": (int, "of those, from one network prefix (default 16)"),
    "max_anonymous_bodies": (int, "activation requests reading their body at once (default 8)"),
    "max_anonymous_bodies_per_prefix": (int, "of those, from one network prefix (default 4)"),
    "anonymous_header_timeout": (float, "seconds for the head of a request without a certificate (default 3)"),
    "ipv4_prefix": (int, "IPv4 prefix length that counts as one source network, 1-32 (default 24)"),
    "ipv6_prefix": (int, "IPv6 prefix length that counts as one source network, 1-128 (default 64)"),
}


def add_limit_flags(parser: argparse.ArgumentParser) -> None:
    """Add the LIMIT_FLAGS to the `serve` parser (unset: None, the ServerLimits default)."""
    for name, (kind, text) in LIMIT_FLAGS.items():
        if name in _PREFIX_BITS:
            parse: Callable[[str], Any] = cliargs.ranged(int, 1, _PREFIX_BITS[name], "a prefix length")
        else:
            parse = cliargs.count if kind is int else cliargs.positive
        parser.add_argument("--" + name.replace("_", "-"), type=parse, help=text)


_PREFIX_BITS: Final = {"ipv4_prefix": 32, "ipv6_prefix": 128}


def prefix_of(address: str, ipv4_bits: int = 24, ipv6_bits: int = 64) -> str:
    """The network prefix *address* belongs to, e.g. "203.0.113.0/24" or "2001:db8::/64".

    An IPv4-mapped IPv6 address counts as its IPv4 address (a dual-stack listener sees
    ``::ffff:203.0.113.7``). Something that is not an address ("?" when the peer is already
    gone) is its own prefix.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    bits = ipv4_bits if ip.version == 4 else ipv6_bits
    return str(ipaddress.ip_network(f"{ip}/{bits}", strict=False))


class Budget:
    """At most *total* holders at once, at most *per_prefix* of them from one prefix."""

    def __init__(self, total: int, per_prefix: int) -> None:
        self.total = total
        self.per_prefix = per_prefix
        self._held: Counter[str] = Counter()
        self._count = 0

    def try_take(self, prefix: str) -> bool:
        """Take one place for *prefix*; False (nothing taken) if the budget or its share is full."""
        if self._count >= self.total or self._held[prefix] >= self.per_prefix:
            return False
        self._held[prefix] += 1
        self._count += 1
        return True

    def give_back(self, prefix: str) -> None:
        """Return a place taken by `try_take`."""
        left = self._held[prefix] - 1
        if left > 0:
            self._held[prefix] = left
        else:
            del self._held[prefix]
        self._count -= 1

    def held(self, prefix: str | None = None) -> int:
        """Places held in all, or by *prefix*."""
        return self._count if prefix is None else self._held.get(prefix, 0)

    def share(self, prefix: str) -> PrefixShare:
        """This budget as one prefix sees it."""
        return PrefixShare(self, prefix)


@dataclass
class PrefixShare:
    """`Budget` seen by one prefix (what `http.Exchange` takes as its body gate)."""

    budget: Budget
    prefix: str

    def try_take(self) -> bool:
        """Take a place; False if the budget or the prefix's share is full."""
        return self.budget.try_take(self.prefix)

    def give_back(self) -> None:
        """Give the place back."""
        self.budget.give_back(self.prefix)


class Evictable(Protocol):
    """What the room can end: a connection's cancel scope."""

    def cancel(self) -> None: ...


@dataclass
class _Seat:
    holder: Evictable


class HandshakeRoom:
    """Connections in the TLS handshake: *capacity* in all, *per_prefix* from one prefix.

    `enter` always admits; when the prefix's share or the room is full, it first evicts
    (cancels) an older connection: the prefix's own oldest, or the oldest of the prefix
    that holds the most seats.
    """

    def __init__(self, capacity: int, per_prefix: int) -> None:
        self.capacity = capacity
        self.per_prefix = per_prefix
        self._by_prefix: dict[str, OrderedDict[int, _Seat]] = {}
        self._count = 0
        self._keys = itertools.count()

    def __len__(self) -> int:
        return self._count

    def enter(self, prefix: str, holder: Evictable) -> int:
        """Seat *holder*, evicting an older connection first if needed; the key for `leave`."""
        seats = self._by_prefix.get(prefix)
        if seats is not None and len(seats) >= self.per_prefix:
            self._evict_oldest(prefix)  # the prefix pays for its own flood
        if self._count >= self.capacity:
            self._evict_oldest(self._heaviest())
        key = next(self._keys)
        self._by_prefix.setdefault(prefix, OrderedDict())[key] = _Seat(holder)
        self._count += 1
        return key

    def leave(self, prefix: str, key: int) -> None:
        """Free the seat (idempotent: an evicted seat is already free)."""
        seats = self._by_prefix.get(prefix)
        if seats is None or seats.pop(key, None) is None:
            return
        self._count -= 1
        if not seats:
            del self._by_prefix[prefix]

    def _heaviest(self) -> str:
        # The prefix holding the most seats; among equals, the one whose oldest seat is oldest.
        return max(self._by_prefix, key=lambda p: (len(self._by_prefix[p]), -next(iter(self._by_prefix[p]))))

    def _evict_oldest(self, prefix: str) -> None:
        seats = self._by_prefix[prefix]
        _key, seat = seats.popitem(last=False)
        self._count -= 1
        if not seats:
            del self._by_prefix[prefix]
        seat.holder.cancel()


@dataclass
class FailureTally:
    """Handshake failures of the current interval, by reason and by prefix."""

    reasons: Counter[str] = field(default_factory=Counter)
    prefixes: Counter[str] = field(default_factory=Counter)

    def add(self, reason: str, prefix: str) -> bool:
        """Count one failure; True if it is the first of the interval (worth its own line)."""
        first = not self.reasons
        self.reasons[reason] += 1
        self.prefixes[prefix] += 1
        return first

    def total(self) -> int:
        """Failures counted in the current interval."""
        return sum(self.reasons.values())

    def drain(self) -> str | None:
        """The interval's summary as ``key=value`` fields (None if nothing failed); resets."""
        if not self.reasons:
            return None
        total = sum(self.reasons.values())
        reasons = ",".join(f"{r}:{n}" for r, n in self.reasons.most_common(8))
        top, top_n = self.prefixes.most_common(1)[0]
        line = (
            f"count={total} prefixes={len(self.prefixes)} reasons={reasons} top_prefix={top} top_prefix_count={top_n}"
        )
        self.reasons.clear()
        self.prefixes.clear()
        return line
