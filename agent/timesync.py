"""Clock synchronisation with the platform's time endpoint (no NTP).

The appliance's own clock may be anything at boot (no RTC battery, a fresh VM). The agent
asks the platform for its UTC time a few times, keeps the sample with the smallest round
trip (as SNTP does) and uses ``offset = server_time - midpoint(send, receive)``. The
offset is applied to certificate validity checks (see ``agent.tls``) and to log and
result timestamps; the system clock itself is never changed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from agent.errors import TimeSyncError

log = logging.getLogger("agent.timesync")

# A platform answer further than this from our clock is still accepted (that is the whole
# point), but it is logged so that an operator sees a broken RTC.
LARGE_OFFSET = 300.0


@dataclass
class Clock:
    """Wall-clock time corrected by the offset measured against the platform."""

    offset: float = 0.0
    synced: bool = False
    round_trip: float = field(default=0.0)

    def now(self) -> float:
        """Platform-aligned UTC epoch seconds."""
        return time.time() + self.offset


@dataclass(frozen=True)
class Sample:
    """One exchange with the time endpoint, in local clock readings."""

    sent: float
    server: float
    received: float

    @property
    def round_trip(self) -> float:
        """Local time between sending the request and receiving the answer."""
        return max(0.0, self.received - self.sent)

    @property
    def offset(self) -> float:
        """Server time minus the local midpoint of the exchange."""
        return self.server - (self.sent + self.received) / 2.0


def best_offset(samples: list[Sample]) -> Sample:
    """The sample with the smallest round trip: its offset has the tightest error bound."""
    if not samples:
        raise TimeSyncError("no time samples from the platform")
    return min(samples, key=lambda s: s.round_trip)


async def sync(
    fetch_time: Callable[[], Awaitable[float]], clock: Clock, samples: int = 3
) -> Clock:
    """Measure the offset with *samples* calls of *fetch_time* and update *clock* in place."""
    got: list[Sample] = []
    last: Exception | None = None
    for _ in range(samples):
        sent = time.time()
        try:
            server = float(await fetch_time())
        except Exception as e:  # noqa: BLE001 - any failure of one sample is retried
            last = e
            continue
        got.append(Sample(sent, server, time.time()))
    if not got:
        # Re-raise the caller's own error type (TLS, unreachable...) so it maps to its code.
        raise last if last is not None else TimeSyncError("no time samples taken")
    best = best_offset(got)
    clock.offset = best.offset
    clock.round_trip = best.round_trip
    clock.synced = True
    level = logging.WARNING if abs(best.offset) > LARGE_OFFSET else logging.INFO
    log.log(
        level,
        "event=time_sync offset=%.3f round_trip=%.3f samples=%d",
        best.offset,
        best.round_trip,
        len(got),
    )
    return clock
