"""Boot sessions, clone detection and quarantine (an appliance's identity over time)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Final

from protocol import api
from tools.platform.db.dialect import Conn
from tools.platform.db.errors import Conflict, NotFound
from tools.platform.db.events import Events, add_event, read_setting

# Sessions kept per appliance: enough to recognise a clone replaying a recent session, and
# bounded so that a rebooting (or malicious) appliance cannot grow the table without limit.
MAX_SESSIONS_PER_APPLIANCE: Final = 32
SETTING_CLONE_QUARANTINE: Final = "clone_quarantine"  # bool, default True
EVENT_CLONE_SUSPECTED: Final = "clone_suspected"


class SessionVerdict(Enum):
    """What open_session()/check_session() decided."""

    OK = "ok"
    QUARANTINED = "quarantined"  # quarantined now or before: refuse
    UNKNOWN = "unknown"  # no such session for this appliance: open one first


@dataclass(frozen=True)
class CloneState:
    """Clone-detection view of one appliance (for `appliance list`)."""

    quarantined_since: float | None
    quarantine_reason: str | None
    boot_counter: int | None  # of the current session
    keystore: str | None  # as reported by the current session
    last_boot: float | None
    attested: bool = False  # the current session's counter and PCRs were verified TPM evidence


@dataclass(frozen=True)
class SessionRow:
    """One kept boot session (operator view: ``appliance sessions``)."""

    public_id: str | None  # api.session_id of its token (None: opened before it was kept)
    boot_counter: int
    keystore: str
    attested: bool
    created_at: float
    current: bool


# What `clear_quarantine` keeps: one session by public id, or none (the next boot decides).
CLEAR_NEXT_BOOT: Final = "next-boot"


def quarantined_since(db: Conn, appliance_id: int) -> float | None:
    """The one per-appliance read of the quarantine table (sessions, heartbeats, health)."""
    row = db.execute("SELECT since FROM quarantine WHERE appliance_id = ?", (appliance_id,)).fetchone()
    return None if row is None else float(row[0])


def _suspect(db: Conn, appliance_id: int, now: float, detail: str) -> bool:
    """Record a clone suspicion; quarantine when the policy says so. True if quarantined."""
    add_event(db, now, appliance_id, EVENT_CLONE_SUSPECTED, detail)
    policy = read_setting(db, SETTING_CLONE_QUARANTINE)
    if not (True if policy is None else bool(policy)):
        return False
    db.execute(
        # Portable upsert (PostgreSQL too): the first suspicion's time and reason stay.
        "INSERT INTO quarantine (appliance_id, since, reason) VALUES (?, ?, ?) ON CONFLICT (appliance_id) DO NOTHING",
        (appliance_id, now, detail),
    )
    add_event(db, now, appliance_id, "quarantined", detail)
    return True


class Sessions(Events):
    """One row per boot of an appliance; quarantine when two instances show up."""

    def open_session(
        self, appliance_id: int, token_hash: bytes, boot_counter: int, keystore: str, now: float,
        *, attested: bool = False, public_id: str | None = None,
    ) -> SessionVerdict:
        """Register a boot. A boot counter not above every earlier one (a second copy
        booting), or far above the last (a forged one, api.MAX_BOOT_COUNTER_STEP), is a clone sign."""
        with self._tx() as db:
            if quarantined_since(db, appliance_id) is not None:
                return SessionVerdict.QUARANTINED
            row = db.execute(
                "SELECT MAX(boot_counter) FROM sessions WHERE appliance_id = ?", (appliance_id,)
            ).fetchone()
            last = row[0]
            detail = None
            if last is not None and boot_counter <= last:
                detail = f"boot counter {boot_counter} is not above {last} (a copy booting?)"
            elif last is not None and boot_counter - last > api.MAX_BOOT_COUNTER_STEP:
                detail = f"boot counter {boot_counter} jumps from {last} (forged, or a copy advanced on its own?)"
            if detail is not None and _suspect(db, appliance_id, now, detail):
                return SessionVerdict.QUARANTINED
            db.execute("UPDATE sessions SET current = 0 WHERE appliance_id = ?", (appliance_id,))
            db.execute(
                "INSERT INTO sessions (appliance_id, token_hash, boot_counter, keystore, created_at, current, "
                "attested, public_id) VALUES (?, ?, ?, ?, ?, 1, ?, ?)",
                (appliance_id, token_hash, boot_counter, keystore, now, int(attested), public_id),
            )
            db.execute(
                "DELETE FROM sessions WHERE appliance_id = ? AND id NOT IN "
                "(SELECT id FROM sessions WHERE appliance_id = ? ORDER BY id DESC LIMIT ?)",
                (appliance_id, appliance_id, MAX_SESSIONS_PER_APPLIANCE),
            )
            add_event(
                db, now, appliance_id, "session_opened",
                f"boot_counter={boot_counter} keystore={keystore} attested={'yes' if attested else 'no'}",
            )  # fmt: skip
        return SessionVerdict.OK

    def check_session(self, appliance_id: int, token_hash: bytes, now: float) -> SessionVerdict:
        """May a request carrying this session proceed? An older session of the appliance
        being used after a newer one opened means two live instances: a clone."""
        with self._tx() as db:
            if quarantined_since(db, appliance_id) is not None:
                return SessionVerdict.QUARANTINED
            row = db.execute(
                "SELECT current, boot_counter FROM sessions WHERE appliance_id = ? AND token_hash = ?",
                (appliance_id, token_hash),
            ).fetchone()
            if row is None:
                return SessionVerdict.UNKNOWN
            if row[0]:
                return SessionVerdict.OK
            live = db.execute(
                "SELECT boot_counter FROM sessions WHERE appliance_id = ? AND current = 1", (appliance_id,)
            ).fetchone()
            detail = f"request from superseded session (boot {row[1]}) while boot {live[0] if live else '?'} is live"
            if _suspect(db, appliance_id, now, detail):
                return SessionVerdict.QUARANTINED
        return SessionVerdict.OK

    def session_boot_counter(self, appliance_id: int, token_hash: bytes) -> int | None:
        """The boot counter a session of this appliance was opened with (None: unknown)."""
        with self._read() as db:
            row = db.execute(
                "SELECT boot_counter FROM sessions WHERE appliance_id = ? AND token_hash = ?",
                (appliance_id, token_hash),
            ).fetchone()
        return None if row is None else int(row[0])

    def quarantined_at(self, appliance_id: int) -> float | None:
        """Since when the appliance is quarantined (clone detection's quarantine table), or None."""
        with self._read() as db:
            return quarantined_since(db, appliance_id)

    def clear_quarantine(
        self, name: str, now: float, keep: str | None = None
    ) -> tuple[str, SessionRow | None]:
        """Lift an appliance's quarantine with the operator's decision; returns the reason it
        had and the session kept.

        *keep* names the legitimate boot: a session's public id, None for the current
        session (the last one the platform accepted), or CLEAR_NEXT_BOOT for none. Every
        other session ends (its token no longer works) and the counter baseline becomes the
        kept session's counter, or none: the next boot that opens a session (an attested
        one, for an enrolled appliance) sets it.
        """
        with self._tx() as db:
            row = db.execute("SELECT id FROM appliances WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise NotFound(f"no appliance named {name!r}; see 'scanner-platform appliance list'")
            app_id = row[0]
            q = db.execute("SELECT reason FROM quarantine WHERE appliance_id = ?", (app_id,)).fetchone()
            if q is None:
                raise Conflict(f"appliance {name!r} is not quarantined")
            select = (
                "SELECT id, public_id, boot_counter, keystore, attested, created_at FROM sessions "
                "WHERE appliance_id = ? AND "
            )
            s = None
            if keep is None:
                s = db.execute(select + "current = 1", (app_id,)).fetchone()
            elif keep != CLEAR_NEXT_BOOT:
                s = db.execute(select + "public_id = ?", (app_id, keep)).fetchone()
                if s is None:
                    raise NotFound(
                        f"appliance {name!r} has no session {keep!r}; see 'scanner-platform appliance sessions {name}'"
                    )
            kept = None if s is None else SessionRow(s[1], int(s[2]), s[3], bool(s[4]), float(s[5]), True)
            db.execute("DELETE FROM sessions WHERE appliance_id = ? AND id <> ?", (app_id, -1 if s is None else s[0]))
            db.execute("UPDATE sessions SET current = 1 WHERE appliance_id = ?", (app_id,))
            db.execute("DELETE FROM quarantine WHERE appliance_id = ?", (app_id,))
            decision = "the next boot decides" if kept is None else f"kept boot {kept.boot_counter}"
            add_event(db, now, app_id, "quarantine_cleared", f"{q[0]}; decision: {decision}")
        return str(q[0]), kept

    def sessions(self, name: str) -> list[SessionRow]:
        """The kept boot sessions of an appliance, newest first."""
        with self._read() as db:
            row = db.execute("SELECT id FROM appliances WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise NotFound(f"no appliance named {name!r}; see 'scanner-platform appliance list'")
            rows = db.execute(
                "SELECT public_id, boot_counter, keystore, attested, created_at, current FROM sessions "
                "WHERE appliance_id = ? ORDER BY id DESC",
                (row[0],),
            ).fetchall()
        return [SessionRow(r[0], int(r[1]), r[2], bool(r[3]), float(r[4]), bool(r[5])) for r in rows]

    def clone_states(self) -> dict[int, CloneState]:
        """Quarantine and current-session facts of every appliance that has any."""
        out: dict[int, CloneState] = {}
        with self._read() as db:
            sessions = {
                r[0]: (r[1], r[2], r[3], bool(r[4]))
                for r in db.execute(
                    "SELECT appliance_id, boot_counter, keystore, created_at, attested FROM sessions WHERE current = 1"
                ).fetchall()
            }
            quarantined = {
                r[0]: (r[1], r[2]) for r in db.execute("SELECT appliance_id, since, reason FROM quarantine").fetchall()
            }
        for app_id in set(sessions) | set(quarantined):
            s = sessions.get(app_id)
            q = quarantined.get(app_id)
            out[app_id] = CloneState(
                quarantined_since=q[0] if q else None,
                quarantine_reason=q[1] if q else None,
                boot_counter=s[0] if s else None,
                keystore=s[1] if s else None,
                last_boot=s[2] if s else None,
                attested=s[3] if s else False,
            )
        return out
