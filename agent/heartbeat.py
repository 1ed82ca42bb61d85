"""Heartbeat: the agent's health, reported to the platform at the interval the platform sets.

The platform tells the interval in ``/v1/config`` and again in every heartbeat answer, so
an operator's change reaches running appliances within one beat. Beats are scheduled on
a fixed grid (``start + k * interval``), not "interval after the last answer", so a slow
round trip does not stretch the period. A failed beat is logged and the next one is sent
on schedule; a ``deactivated`` answer stops the agent like any other deactivation, and a
``quarantined`` answer like any other quarantine (exit 31).

Heartbeats are sent in this boot's session (``X-Scanner-Session``) like every request
after the session opened, so they take part in clone detection: a copy beating with an
older session is seen by the platform exactly like one asking for jobs.

What a heartbeat carries (``protocol.api.HB_*``): agent version, boot session (its public
id, `protocol.api.session_id`; the token is a credential and stays in the header) and boot
counter, uptime, clock offset, scratch and volume usage in bytes, jobs done/failed since
boot and the last error as ``event reason=...``. Never scan data, targets, banners,
credentials or keys: the document is built here from counters and statvfs only, and the
platform whitelists the same fields.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Final

import trio

from agent.errors import Deactivated, Quarantined
from agent.timesync import Clock
from protocol import api
from protocol.client import DeactivatedError, PlatformClient, PlatformError, QuarantinedError

log = logging.getLogger("agent.heartbeat")

STATVFS_TIMEOUT: Final = 2.0  # a wedged FUSE mount must not stall the beat


def agent_version() -> str:
    """The installed package version (what the platform shows operators)."""
    try:
        return metadata.version("scratchfs")[: api.MAX_AGENT_VERSION]
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass
class Health:
    """Counters since this boot of the agent (updated by the lifecycle and the job loop)."""

    started: float = field(default_factory=time.monotonic)
    jobs_done: int = 0
    jobs_failed: int = 0
    last_error: str | None = None
    # This boot's session (set once it is open): its public id, never the token, and the
    # keystore's boot counter it was opened with.
    boot_session: str | None = None
    boot_counter: int | None = None

    def error(self, text: str) -> None:
        """Remember the latest error: an event name and reason, never data or secrets."""
        self.last_error = text[: api.MAX_LAST_ERROR]


def _usage(path: Path) -> dict[str, int]:
    st = os.statvfs(path)
    total = st.f_blocks * st.f_frsize
    return {api.HB_USED: max(0, total - st.f_bfree * st.f_frsize), api.HB_TOTAL: total}


async def usage(path: Path | None) -> dict[str, int] | None:
    """Used/total bytes of the filesystem at *path*, or None (not mounted, or no answer)."""
    if path is None:
        return None
    with trio.move_on_after(STATVFS_TIMEOUT):
        try:
            return await trio.to_thread.run_sync(_usage, path, abandon_on_cancel=True)
        except OSError:
            return None
    return None


class Heartbeat:
    """Sends heartbeats until cancelled; run ``run()`` in the agent's nursery."""

    def __init__(
        self,
        client: PlatformClient,
        health: Health,
        clock: Clock,
        mounts: Callable[[], tuple[Path | None, Path | None]],
        interval: float,
    ) -> None:
        """*mounts* returns (scratch mountpoint, volume mountpoint), None while not mounted."""
        self.client = client
        self.health = health
        self.clock = clock
        self.mounts = mounts
        self.interval = interval
        self.sent = 0
        self.version = agent_version()

    def __repr__(self) -> str:
        return f"<Heartbeat interval={self.interval:g} sent={self.sent}>"

    async def status(self) -> dict[str, Any]:
        """The heartbeat document, built from counters and statvfs only."""
        scratch, volume = self.mounts()
        h = self.health
        return {
            api.HB_AGENT_VERSION: self.version,
            api.HB_BOOT_SESSION: h.boot_session,
            api.HB_BOOT_COUNTER: h.boot_counter,
            api.HB_UPTIME: round(time.monotonic() - h.started, 3),
            api.HB_TIME_OFFSET: round(self.clock.offset, 6),
            api.HB_SCRATCH: await usage(scratch),
            api.HB_VOLUME: await usage(volume),
            api.HB_JOBS_DONE: h.jobs_done,
            api.HB_JOBS_FAILED: h.jobs_failed,
            api.HB_LAST_ERROR: h.last_error,
        }

    async def beat(self) -> None:
        """Send one heartbeat; adopt the interval the platform answers with."""
        try:
            interval = await self.client.heartbeat(await self.status())
        except DeactivatedError:
            raise Deactivated("the platform deactivated this appliance") from None
        except QuarantinedError:
            raise Quarantined("heartbeat: the platform quarantined this appliance") from None
        except PlatformError as e:
            log.warning("event=heartbeat_failed reason=%s", e.reason)
            self.health.error(f"heartbeat_failed reason={e.reason}")
            return
        self.sent += 1
        log.debug("event=heartbeat_sent n=%d", self.sent)
        if interval is not None and interval != self.interval:
            log.info("event=heartbeat_interval old=%g new=%g", self.interval, interval)
            self.interval = interval

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Beat on a fixed grid until cancelled."""
        task_status.started()
        log.info("event=heartbeat_started interval=%g", self.interval)
        due = trio.current_time()
        while True:
            await self.beat()  # bounded by the client's own request timeout
            due += self.interval
            # A beat slower than the interval (platform slow) must not be followed by a
            # burst of catch-up beats: start a new grid from now instead.
            due = max(due, trio.current_time())
            await trio.sleep_until(due)
