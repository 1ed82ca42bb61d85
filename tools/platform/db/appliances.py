"""Appliances and their identity: lifecycle rows, activation, certificates, revocation."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from tools.platform.db.dialect import Conn
from tools.platform.db.errors import Conflict, NotFound
from tools.platform.db.events import Events, add_event

STATE_PENDING: Final = "pending"
STATE_ACTIVE: Final = "active"
STATE_DEACTIVATED: Final = "deactivated"

APPLIANCE_SELECT: Final = (
    "SELECT id, name, state, created_at, code_expires, activated_at, deactivated_at, "
    "x25519_public, cert_serial, cert_fingerprint, hybrid_public FROM appliances"
)


@dataclass(frozen=True)
class Appliance:
    """One appliance row (the wrapped key is not part of it: ask for it explicitly)."""

    id: int
    name: str
    state: str
    created_at: float
    code_expires: float | None
    activated_at: float | None
    deactivated_at: float | None
    x25519_public: bytes | None
    cert_serial: str | None
    cert_fingerprint: str | None
    hybrid_public: bytes | None = None


@dataclass(frozen=True)
class ActivationGrant:
    """What activation stored: the appliance and its newly issued certificate."""

    appliance: Appliance
    cert_pem: bytes


def appliance_from_row(row: tuple[Any, ...]) -> Appliance:
    """An `Appliance` from a row of APPLIANCE_SELECT."""
    return Appliance(*row)


def active_appliance_id(db: Conn, name: str) -> int:
    """The id of the active appliance *name* (credentials and jobs need one); raise
    NotFound or Conflict."""
    row = db.execute("SELECT id, state FROM appliances WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise NotFound(f"no appliance named {name!r}")
    if row[1] != STATE_ACTIVE:
        raise Conflict(f"appliance {name!r} is {row[1]}, not active")
    return int(row[0])


def revoke_current(db: Conn, app: Appliance, now: float, reason: str) -> None:
    """Revoke the appliance's current certificate, if it has one (idempotent)."""
    if app.cert_serial is not None and app.cert_fingerprint is not None:
        db.execute(
            "INSERT INTO revoked (serial, fingerprint, appliance_id, revoked_at, reason) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (serial) DO NOTHING",
            (app.cert_serial, app.cert_fingerprint, app.id, now, reason),
        )


class Appliances(Events):
    """Appliance rows, activation and certificates."""

    def add_appliance(self, name: str, code_hash: bytes, code_expires: float, now: float) -> None:
        """Create a pending appliance with its activation code hash."""
        with self._tx() as db:
            if db.execute("SELECT 1 FROM appliances WHERE name = ?", (name,)).fetchone():
                raise Conflict(f"appliance {name!r} exists already; choose another name")
            row = db.execute(
                "INSERT INTO appliances (name, state, created_at, code_hash, code_expires) VALUES (?, ?, ?, ?, ?) "
                "RETURNING id",
                (name, STATE_PENDING, now, code_hash, code_expires),
            ).fetchone()
            add_event(db, now, row[0], "appliance_added")

    def appliance(self, name: str) -> Appliance:
        """The appliance called *name*; raise NotFound."""
        with self._read() as db:
            row = db.execute(APPLIANCE_SELECT + " WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"no appliance named {name!r}; see 'scanner-platform appliance list'")
        return appliance_from_row(row)

    def appliances(self) -> list[Appliance]:
        """Every appliance, by name."""
        with self._read() as db:
            return [appliance_from_row(r) for r in db.execute(APPLIANCE_SELECT + " ORDER BY name")]

    def appliance_by_fingerprint(self, fp: str) -> Appliance | None:
        """The appliance whose current certificate has SHA-256 fingerprint *fp*."""
        with self._read() as db:
            row = db.execute(APPLIANCE_SELECT + " WHERE cert_fingerprint = ?", (fp,)).fetchone()
        return None if row is None else appliance_from_row(row)

    def identify(self, serial: str, fp: str) -> tuple[bool, Appliance | None]:
        """(revoked?, appliance of this certificate) in one round trip to the database."""
        with self._read() as db:
            revoked = db.execute("SELECT 1 FROM revoked WHERE serial = ? OR fingerprint = ?", (serial, fp)).fetchone()
            row = db.execute(APPLIANCE_SELECT + " WHERE cert_fingerprint = ?", (fp,)).fetchone()
        return revoked is not None, None if row is None else appliance_from_row(row)

    def is_revoked(self, serial: str, fp: str) -> bool:
        """True if a certificate with this serial or fingerprint was revoked."""
        with self._read() as db:
            row = db.execute("SELECT 1 FROM revoked WHERE serial = ? OR fingerprint = ?", (serial, fp)).fetchone()
        return row is not None

    def revoked(self) -> list[tuple[str, float]]:
        """The revocation list: (hex serial, revoked-at)."""
        with self._read() as db:
            rows = db.execute("SELECT serial, revoked_at FROM revoked ORDER BY revoked_at").fetchall()
        return [(str(r[0]), float(r[1])) for r in rows]

    def activate(
        self,
        code_hash: bytes,
        now: float,
        x25519_public: bytes,
        issue: Callable[[str], tuple[bytes, str, str]],
        wrap_new_keyslot_passphrase: Callable[[int, str], bytes],
        hybrid_public: bytes | None = None,
    ) -> ActivationGrant:
        """Redeem an activation code atomically.

        *issue(name)* returns (cert PEM, hex serial, fingerprint);
        *wrap_new_keyslot_passphrase(id, name)* returns a freshly generated keyslot
        passphrase wrapped under the KEK. Raises NotFound (unknown or used code) or
        Conflict("expired").
        """
        with self._tx() as db:
            row = db.execute(
                APPLIANCE_SELECT + " WHERE code_hash = ? AND state = ? FOR UPDATE",
                (code_hash, STATE_PENDING),
            ).fetchone()
            if row is None:
                raise NotFound("activation code is unknown or was used already")
            app = appliance_from_row(row)
            if app.code_expires is None or now >= app.code_expires:
                raise Conflict("activation code has expired")
            cert_pem, serial, fp = issue(app.name)
            wrapped = wrap_new_keyslot_passphrase(app.id, app.name)
            db.execute(
                # The column keeps its first name (renaming it would need a migration).
                "UPDATE appliances SET state = ?, code_hash = NULL, activated_at = ?, "
                "x25519_public = ?, cert_serial = ?, cert_fingerprint = ?, wrapped_volume_key = ?, "
                "hybrid_public = ? WHERE id = ?",
                (STATE_ACTIVE, now, x25519_public, serial, fp, wrapped, hybrid_public, app.id),
            )
            add_event(db, now, app.id, "activated", f"serial={serial}")
            new = appliance_from_row(db.execute(APPLIANCE_SELECT + " WHERE id = ?", (app.id,)).fetchone())
        return ActivationGrant(appliance=new, cert_pem=cert_pem)

    def set_hybrid_public(self, appliance_id: int, public: bytes, now: float) -> bool:
        """Record an active appliance's hybrid key; False if it already has the same one.

        Raise Conflict when it has a different one: blobs sealed to the first would become
        unreadable on the appliance, so replacing it is not a thing this endpoint does.
        """
        with self._tx() as db:
            row = db.execute(
                "SELECT hybrid_public FROM appliances WHERE id = ? AND state = ?",
                (appliance_id, STATE_ACTIVE),
            ).fetchone()
            if row is None:
                raise NotFound("no such active appliance")
            if row[0] is not None:
                if hmac.compare_digest(bytes(row[0]), public):
                    return False
                raise Conflict("appliance has a different hybrid key on record")
            db.execute("UPDATE appliances SET hybrid_public = ? WHERE id = ?", (public, appliance_id))
            add_event(db, now, appliance_id, "seal_key_upgraded")
        return True

    def renew_certificate(self, appliance_id: int, now: float, issue: Callable[[str], tuple[bytes, str, str]]) -> bytes:
        """Issue a new client certificate and revoke the current one, atomically."""
        with self._tx() as db:
            row = db.execute(APPLIANCE_SELECT + " WHERE id = ? AND state = ?", (appliance_id, STATE_ACTIVE)).fetchone()
            if row is None:
                raise NotFound("appliance is not active")
            app = appliance_from_row(row)
            cert_pem, serial, fp = issue(app.name)
            revoke_current(db, app, now, "superseded")
            db.execute("UPDATE appliances SET cert_serial = ?, cert_fingerprint = ? WHERE id = ?", (serial, fp, app.id))
            add_event(db, now, app.id, "certificate_renewed", f"serial={serial} revoked={app.cert_serial}")
        return cert_pem
