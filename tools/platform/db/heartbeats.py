"""Heartbeats and health: the latest status per appliance, a bounded history, and the
health state the evaluator recorded (moved by compare-and-set, so each transition happens once).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from tools.platform.db.connection import Database
from tools.platform.db.events import add_event
from tools.platform.db.sessions import quarantined_since

# Health states shown by `appliance list` (pending appliances show "pending").
HEALTH_OK: Final = "ok"
HEALTH_LATE: Final = "late"
HEALTH_MISSING: Final = "missing"
HEALTH_QUARANTINED: Final = "quarantined"
HEALTH_DEACTIVATED: Final = "deactivated"
HEALTH_PENDING: Final = "pending"
HEARTBEAT_HISTORY: Final = 100  # heartbeats kept per appliance (older ones are deleted)


@dataclass(frozen=True)
class Health:
    """What the platform knows about an appliance's heartbeats."""

    appliance_id: int
    name: str
    state: str  # the appliance's lifecycle state (pending / active / deactivated)
    activated_at: float | None
    quarantined_at: float | None
    last_seen: float | None
    status: dict[str, Any] | None  # the latest heartbeat document
    recorded: str  # health state last recorded by the evaluator
    recorded_since: float | None


class Heartbeats(Database):
    """Heartbeat status, history and recorded health of every appliance."""

    def record_heartbeat(self, appliance_id: int, status: dict[str, Any], now: float) -> bool:
        """Store the latest status and append it to the bounded history; False (nothing
        stored) if the appliance is quarantined by now. Checked in the same transaction:
        the session check before it may predate a quarantine that a clone's boot just
        caused, and a quarantined appliance's health must not show fresh beats."""
        doc = json.dumps(status, sort_keys=True, separators=(",", ":"))
        with self._tx() as db:
            if quarantined_since(db, appliance_id) is not None:
                return False
            db.execute(
                "INSERT INTO appliance_health (appliance_id, last_seen, status, health, health_since) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (appliance_id) DO UPDATE SET "
                "last_seen = excluded.last_seen, status = excluded.status",
                (appliance_id, now, doc, HEALTH_OK, now),
            )
            db.execute(
                "INSERT INTO heartbeats (appliance_id, received_at, status) VALUES (?, ?, ?)",
                (appliance_id, now, doc),
            )
            db.execute(
                "DELETE FROM heartbeats WHERE appliance_id = ? AND id NOT IN "
                "(SELECT id FROM heartbeats WHERE appliance_id = ? ORDER BY id DESC LIMIT ?)",
                (appliance_id, appliance_id, HEARTBEAT_HISTORY),
            )
        return True

    def health(self) -> list[Health]:
        """Heartbeat knowledge of every appliance, by name."""
        with self._read() as db:
            rows = db.execute(
                # Quarantine comes from clone detection's own table: one source of truth.
                "SELECT a.id, a.name, a.state, a.activated_at, q.since, h.last_seen, h.status, "
                "h.health, h.health_since FROM appliances a "
                "LEFT JOIN appliance_health h ON h.appliance_id = a.id "
                "LEFT JOIN quarantine q ON q.appliance_id = a.id ORDER BY a.name"
            ).fetchall()
        return [
            Health(
                appliance_id=r[0],
                name=r[1],
                state=r[2],
                activated_at=r[3],
                quarantined_at=r[4],
                last_seen=r[5],
                status=None if r[6] is None else json.loads(r[6]),
                recorded=r[7] or HEALTH_OK,
                recorded_since=r[8],
            )
            for r in rows
        ]

    def heartbeat_history(self, appliance_id: int) -> list[tuple[float, dict[str, Any]]]:
        """(received at, status) of the kept heartbeats, oldest first."""
        with self._read() as db:
            rows = db.execute(
                "SELECT received_at, status FROM heartbeats WHERE appliance_id = ? ORDER BY id", (appliance_id,)
            ).fetchall()
        return [(float(r[0]), json.loads(r[1])) for r in rows]

    def transition_health(
        self, appliance_id: int, expected: str, new: str, now: float, event_kind: str, detail: str
    ) -> bool:
        """Move the recorded health from *expected* to *new* and log *event_kind* atomically.

        Returns False (and changes nothing) when another evaluator already moved it: the
        caller that gets True is the only one that may run the alert hook.
        """
        with self._tx() as db:
            # A real compare-and-set on both backends: the conditional UPDATE (or the INSERT
            # of a missing row) changes a row for exactly one of two racing evaluators.
            # Reading first and writing after would let both PostgreSQL transactions (read
            # committed) see the old state and both run the hook.
            moved = db.execute(
                "UPDATE appliance_health SET health = ?, health_since = ? WHERE appliance_id = ? AND health = ?",
                (new, now, appliance_id, expected),
            ).rowcount
            if moved == 0 and expected == HEALTH_OK:
                moved = db.execute(
                    "INSERT INTO appliance_health (appliance_id, last_seen, status, health, health_since) "
                    "VALUES (?, NULL, NULL, ?, ?) ON CONFLICT (appliance_id) DO NOTHING",
                    (appliance_id, new, now),
                ).rowcount
            if moved != 1:
                return False
            add_event(db, now, appliance_id, event_kind, detail)
        return True
