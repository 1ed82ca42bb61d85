"""Sealed credentials: stored per appliance, opaque to the platform (sealed to the appliance)."""

from __future__ import annotations

from tools.platform.db.appliances import active_appliance_id
from tools.platform.db.connection import Database
from tools.platform.db.errors import Conflict


class Credentials(Database):
    """An appliance's sealed credentials, by name."""

    def add_credential(self, appliance: str, name: str, sealed: bytes, now: float) -> None:
        """Store a sealed credential for an active appliance."""
        with self._tx() as db:
            appliance_id = active_appliance_id(db, appliance)
            if db.execute(
                "SELECT 1 FROM credentials WHERE appliance_id = ? AND name = ?", (appliance_id, name)
            ).fetchone():
                raise Conflict(f"credential {name!r} exists already for {appliance!r}")
            db.execute(
                "INSERT INTO credentials (appliance_id, name, sealed, created_at) VALUES (?,?,?,?)",
                (appliance_id, name, sealed, now),
            )

    def credentials(self, appliance: str) -> list[str]:
        """Names of an appliance's credentials."""
        with self._read() as db:
            return [
                str(r[0])
                for r in db.execute(
                    "SELECT c.name FROM credentials c JOIN appliances a ON a.id = c.appliance_id "
                    "WHERE a.name = ? ORDER BY c.name",
                    (appliance,),
                )
            ]
