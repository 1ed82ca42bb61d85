"""Settings (JSON values by key) and the audit event log."""

from __future__ import annotations

import json
from typing import Any

from tools.platform.db.connection import Database
from tools.platform.db.dialect import Conn


def add_event(
    db: Conn, now: float, appliance_id: int | None, kind: str, detail: str = "", job_id: int | None = None
) -> None:
    """Append an audit event inside the caller's transaction (never a secret in *detail*)."""
    db.execute(
        "INSERT INTO events (at, appliance_id, job_id, kind, detail) VALUES (?,?,?,?,?)",
        (now, appliance_id, job_id, kind, detail),
    )


def put_setting(db: Conn, key: str, value: Any) -> None:
    """Store a JSON-serialisable setting inside the caller's transaction."""
    db.execute(
        "INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, json.dumps(value)),
    )


def read_setting(db: Conn, key: str) -> Any:
    """A setting inside the caller's transaction, or None."""
    row = db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
    return None if row is None else json.loads(row[0])


class Events(Database):
    """Settings and audit events."""

    def set_setting(self, key: str, value: Any) -> None:
        """Store a JSON-serialisable setting."""
        with self._tx() as db:
            put_setting(db, key, value)

    def get_setting(self, key: str) -> Any:
        """A setting, or None."""
        with self._read() as db:
            return read_setting(db, key)

    def delete_setting(self, key: str) -> None:
        """Remove a setting (no error when absent)."""
        with self._tx() as db:
            db.execute("DELETE FROM settings WHERE key = ?", (key,))

    def log_event(
        self,
        now: float,
        kind: str,
        appliance_id: int | None,
        job_id: int | None = None,
        detail: str = "",
    ) -> None:
        """Append an audit event (never a secret in *detail*)."""
        with self._tx() as db:
            add_event(db, now, appliance_id, kind, detail, job_id)

    def events(self, kind: str | None = None) -> list[tuple[float, int | None, int | None, str, str]]:
        """Audit events, oldest first: (at, appliance_id, job_id, kind, detail)."""
        sql = "SELECT at, appliance_id, job_id, kind, detail FROM events"
        args: tuple[Any, ...] = ()
        if kind is not None:
            sql += " WHERE kind = ?"
            args = (kind,)
        with self._read() as db:
            return [tuple(r) for r in db.execute(sql + " ORDER BY id", args)]
