"""Appliance health from heartbeats: derived states, transitions, the operator alert hook.

An active appliance is ``ok`` while its heartbeats arrive, ``late`` once it missed one
beat, ``missing`` once it missed ``missing_after`` beats (counted from its last heartbeat,
or from its activation if it never sent one). ``quarantined`` and ``deactivated`` come from
the appliance's own record and override the heartbeat view; a pending appliance is
``pending``. `derive` is pure, so `scanner-platform appliance list` shows the same state
the server's evaluator acts on.

Only the evaluator (`watch`, run by ``serve``) records transitions: each one is a
compare-and-set in the database (`Storage.transition_health`) together with its event
(``heartbeat_missed`` or ``heartbeat_resumed``), so however many evaluators run, each
transition happens once and its alert hook runs once. The hook is an argv (no shell) that
receives the event as JSON on stdin and is killed when it outlives its timeout.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Final

import trio

from protocol import api
from tools.platform import db

log = logging.getLogger("scanner-platform.health")

SETTING_HEARTBEAT: Final = "heartbeat"  # {"interval": float, "missing_after": int}
SETTING_ALERT_HOOK: Final = "alert_hook"  # {"argv": [str, ...], "timeout": float}
DEFAULT_MISSING_AFTER: Final = 3
MAX_MISSING_AFTER: Final = 1000
DEFAULT_HOOK_TIMEOUT: Final = 10.0
MAX_HOOK_TIMEOUT: Final = 300.0
# A beat counts as missed only once this fraction of an interval has passed beyond it:
# network and scheduling jitter must not flap an idle appliance to "late".
GRACE: Final = 0.5
HOOK_CONCURRENCY: Final = 4  # hooks run at once (a platform restart may flag many at once)
MAX_HOOK_OUTPUT: Final = 4096  # bytes of a hook's output kept for the log line
EVENT_MISSED: Final = "heartbeat_missed"
EVENT_RESUMED: Final = "heartbeat_resumed"
_HEARTBEAT_STATES: Final = (db.HEALTH_OK, db.HEALTH_LATE, db.HEALTH_MISSING)


@dataclass(frozen=True)
class Policy:
    """How often appliances beat, and after how many missed beats they are missing."""

    interval: float = api.DEFAULT_HEARTBEAT_INTERVAL
    missing_after: int = DEFAULT_MISSING_AFTER

    @classmethod
    def load(cls, storage: db.Storage) -> Policy:
        """The stored policy (defaults where unset)."""
        value = storage.get_setting(SETTING_HEARTBEAT)
        if not isinstance(value, dict):
            return cls()
        return cls(
            interval=float(value.get("interval", api.DEFAULT_HEARTBEAT_INTERVAL)),
            missing_after=int(value.get("missing_after", DEFAULT_MISSING_AFTER)),
        )

    def to_setting(self) -> dict[str, Any]:
        """The JSON stored in settings."""
        return {"interval": self.interval, "missing_after": self.missing_after}


@dataclass(frozen=True)
class Hook:
    """The operator's alert command: argv, run without a shell, bounded in time."""

    argv: tuple[str, ...]
    timeout: float = DEFAULT_HOOK_TIMEOUT

    @classmethod
    def load(cls, storage: db.Storage) -> Hook | None:
        """The configured hook, or None."""
        value = storage.get_setting(SETTING_ALERT_HOOK)
        if not isinstance(value, dict) or not value.get("argv"):
            return None
        return cls(tuple(str(a) for a in value["argv"]), float(value.get("timeout", DEFAULT_HOOK_TIMEOUT)))

    def to_setting(self) -> dict[str, Any]:
        """The JSON stored in settings."""
        return {"argv": list(self.argv), "timeout": self.timeout}


@dataclass(frozen=True)
class Derived:
    """An appliance's state as of some moment, and how many beats it missed."""

    state: str
    missed: int


def missed_beats(age: float, interval: float) -> int:
    """Beats missed *age* seconds after the last heartbeat. Pure."""
    if age <= interval * (1 + GRACE):
        return 0
    return math.floor(age / interval)


def derive(health: db.Health, policy: Policy, now: float) -> Derived:
    """The state `appliance list` shows and the evaluator acts on. Pure."""
    if health.state == db.STATE_DEACTIVATED:
        return Derived(db.HEALTH_DEACTIVATED, 0)
    if health.state == db.STATE_PENDING:
        return Derived(db.HEALTH_PENDING, 0)
    if health.quarantined_at is not None:
        return Derived(db.HEALTH_QUARANTINED, 0)
    reference = health.last_seen if health.last_seen is not None else health.activated_at
    missed = 0 if reference is None else missed_beats(max(0.0, now - reference), policy.interval)
    if missed == 0:
        return Derived(db.HEALTH_OK, 0)
    if missed < policy.missing_after:
        return Derived(db.HEALTH_LATE, missed)
    return Derived(db.HEALTH_MISSING, missed)


def event_document(
    health: db.Health, kind: str, previous: str, new: Derived, policy: Policy, now: float
) -> dict[str, Any]:
    """What the alert hook reads on stdin (no secret, no scan data)."""
    return {
        "event": kind,
        "appliance": health.name,
        "state": new.state,
        "previous": previous,
        "missed": new.missed,
        "last_seen": health.last_seen,
        "interval": policy.interval,
        "missing_after": policy.missing_after,
        "at": now,
    }


async def run_hook(hook: Hook, event: dict[str, Any]) -> int | None:
    """Run the hook once with *event* as JSON on stdin; its exit status, None if killed."""
    data = (json.dumps(event, sort_keys=True) + "\n").encode()
    with trio.move_on_after(hook.timeout):
        try:
            proc = await trio.run_process(
                list(hook.argv),
                stdin=data,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        except OSError as e:
            why = e.strerror or type(e).__name__
            log.error("event=alert_hook_failed appliance=%s error=%s", event["appliance"], why)
            return None
        output = (proc.stdout + proc.stderr)[:MAX_HOOK_OUTPUT].decode(errors="replace").strip()
        level = logging.INFO if proc.returncode == 0 else logging.WARNING
        log.log(
            level,
            "event=alert_hook appliance=%s state=%s rc=%d output=%r",
            event["appliance"],
            event["state"],
            proc.returncode,
            output[:300],
        )
        return int(proc.returncode)
    log.error("event=alert_hook_timeout appliance=%s timeout=%g", event["appliance"], hook.timeout)
    return None


def _pending_transitions(storage: db.Storage, now: float) -> tuple[Policy, Hook | None, list[dict[str, Any]]]:
    """Record every due transition (compare-and-set) and return the events this caller won."""
    policy = Policy.load(storage)
    hook = Hook.load(storage)
    won: list[dict[str, Any]] = []
    for h in storage.health():
        new = derive(h, policy, now)
        if new.state not in _HEARTBEAT_STATES or new.state == h.recorded:
            continue
        kind = EVENT_RESUMED if new.state == db.HEALTH_OK else EVENT_MISSED
        detail = f"state={new.state} previous={h.recorded} missed={new.missed}"
        if storage.transition_health(h.appliance_id, h.recorded, new.state, now, kind, detail):
            level = logging.INFO if kind == EVENT_RESUMED else logging.WARNING
            log.log(
                level,
                "event=%s appliance=%s state=%s previous=%s missed=%d",
                kind, h.name, new.state, h.recorded, new.missed,
            )  # fmt: skip
            won.append(event_document(h, kind, h.recorded, new, policy, now))
    return policy, hook, won


async def evaluate(database: Any, now: float | None = None) -> tuple[Policy, list[dict[str, Any]]]:
    """One evaluation: record transitions, run the hook once for each; return the events.

    *database* is a `handlers.Database` (Storage calls on its worker thread).
    """
    at = time.time() if now is None else now
    policy, hook, events = await database.run(_pending_transitions, database.storage, at)
    if hook is not None and events:
        limiter = trio.CapacityLimiter(HOOK_CONCURRENCY)

        async def one(event: dict[str, Any]) -> None:
            async with limiter:
                await run_hook(hook, event)

        async with trio.open_nursery() as nursery:
            for event in events:
                nursery.start_soon(one, event)
    return policy, events


def check_period(policy: Policy) -> float:
    """How often the evaluator runs: a quarter interval, between 0.05 and 5 seconds."""
    return min(max(policy.interval / 4, 0.05), 5.0)


async def watch(database: Any, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Evaluate health on a timer until cancelled (``serve`` runs this)."""
    task_status.started()
    while True:
        try:
            policy, _ = await evaluate(database)
        except Exception as e:  # noqa: BLE001 - one failed round (locked DB...) must not stop the timer
            log.error("event=health_check_failed error=%s", type(e).__name__)
            policy = Policy()
        await trio.sleep(check_period(policy))


__all__ = [
    "EVENT_MISSED",
    "EVENT_RESUMED",
    "Derived",
    "Hook",
    "Policy",
    "check_period",
    "derive",
    "evaluate",
    "missed_beats",
    "run_hook",
    "watch",
]
