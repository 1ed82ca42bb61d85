"""Storage: SQLite in WAL mode, schema versioned by migrations, behind one small class.

`Storage` is the only place that knows SQL. Every method is one transaction, so the server
(through a worker thread) and CLI processes can use the same file at the same time. A
production platform would implement the same methods on PostgreSQL.

Migrations are numbered; ``PRAGMA user_version`` records the last one applied. A database
written by a newer platform is refused instead of being silently misread.
"""

from __future__ import annotations

import hmac
import json
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Final

from protocol import sealing
from protocol.scope import Scope, ScopeError

MIGRATIONS: Final[list[tuple[int, list[str]]]] = [
    (
        1,
        [
            """CREATE TABLE appliances (
                id INTEGER PRIMARY KEY,
                name TEXT NOT NULL UNIQUE,
                state TEXT NOT NULL CHECK (state IN ('pending', 'active', 'deactivated')),
                created_at REAL NOT NULL,
                code_hash BLOB UNIQUE,
                code_expires REAL,
                activated_at REAL,
                deactivated_at REAL,
                x25519_public BLOB,
                cert_serial TEXT,
                cert_fingerprint TEXT UNIQUE,
                wrapped_volume_key BLOB
            )""",
            """CREATE TABLE revoked (
                serial TEXT PRIMARY KEY,
                fingerprint TEXT NOT NULL,
                appliance_id INTEGER NOT NULL REFERENCES appliances(id),
                revoked_at REAL NOT NULL,
                reason TEXT NOT NULL
            )""",
            """CREATE TABLE credentials (
                id INTEGER PRIMARY KEY,
                appliance_id INTEGER NOT NULL REFERENCES appliances(id),
                name TEXT NOT NULL,
                sealed BLOB NOT NULL,
                created_at REAL NOT NULL,
                UNIQUE (appliance_id, name)
            )""",
            """CREATE TABLE jobs (
                id INTEGER PRIMARY KEY,
                appliance_id INTEGER NOT NULL REFERENCES appliances(id),
                targets TEXT NOT NULL,
                ports TEXT NOT NULL,
                engine TEXT NOT NULL,
                credential_id INTEGER REFERENCES credentials(id),
                state TEXT NOT NULL CHECK (state IN ('queued', 'leased', 'done', 'cancelled')),
                created_at REAL NOT NULL,
                lease_expires REAL,
                attempts INTEGER NOT NULL DEFAULT 0,
                progress TEXT,
                completed_at REAL
            )""",
            """CREATE TABLE results (
                job_id INTEGER PRIMARY KEY REFERENCES jobs(id),
                sha256 TEXT NOT NULL,
                size INTEGER NOT NULL,
                body BLOB NOT NULL,
                received_at REAL NOT NULL
            )""",
            """CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)""",
            """CREATE TABLE events (
                id INTEGER PRIMARY KEY,
                at REAL NOT NULL,
                appliance_id INTEGER,
                job_id INTEGER,
                kind TEXT NOT NULL,
                detail TEXT NOT NULL DEFAULT ''
            )""",
        ],
    ),
    (
        2,
        [
            "CREATE INDEX jobs_by_appliance_state ON jobs (appliance_id, state, id)",
            "CREATE INDEX events_by_job ON events (job_id, kind)",
        ],
    ),
    (
        3,
        [
            # Sealing format v2: the appliance's hybrid (ML-KEM-768 + X25519) public key,
            # set at activation or later over mutual TLS (POST /v1/appliance/seal-key).
            # NULL = the appliance still has only its X25519 key (keyslot passphrase sealed v1).
            "ALTER TABLE appliances ADD COLUMN hybrid_public BLOB",
        ],
    ),
    (
        4,
        [
            # One row per boot of an appliance (clone detection). Only token hashes are kept.
            """CREATE TABLE sessions (
                id INTEGER PRIMARY KEY,
                appliance_id INTEGER NOT NULL REFERENCES appliances(id),
                token_hash BLOB NOT NULL UNIQUE,
                boot_counter INTEGER NOT NULL,
                keystore TEXT NOT NULL,
                created_at REAL NOT NULL,
                current INTEGER NOT NULL CHECK (current IN (0, 1))
            )""",
            "CREATE INDEX sessions_by_appliance ON sessions (appliance_id, id)",
            # A row means: quarantined (no volume key, no jobs) until an operator clears it.
            """CREATE TABLE quarantine (
                appliance_id INTEGER PRIMARY KEY REFERENCES appliances(id),
                since REAL NOT NULL,
                reason TEXT NOT NULL
            )""",
        ],
    ),
]
SCHEMA_VERSION: Final = MIGRATIONS[-1][0]

STATE_PENDING: Final = "pending"
STATE_ACTIVE: Final = "active"
STATE_DEACTIVATED: Final = "deactivated"
# Sessions kept per appliance: enough to recognise a clone replaying a recent session, and
# bounded so that a rebooting (or malicious) appliance cannot grow the table without limit.
MAX_SESSIONS_PER_APPLIANCE: Final = 32
SETTING_CLONE_QUARANTINE: Final = "clone_quarantine"  # bool, default True
EVENT_CLONE_SUSPECTED: Final = "clone_suspected"


class StorageError(Exception):
    """A storage problem the operator can act on (the message says what to do)."""


class Conflict(StorageError):
    """The object exists already, or the request contradicts the stored state."""


class NotFound(StorageError):
    """No such appliance, job or credential."""


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
class JobRow:
    """One job, with its credential (sealed) when it has one."""

    id: int
    appliance: str
    appliance_id: int
    targets: list[str]
    ports: str
    engine: str
    state: str
    created_at: float
    lease_expires: float | None
    attempts: int
    progress: str | None
    completed_at: float | None
    credential_name: str | None
    credential_sealed: bytes | None = field(repr=False)
    result_sha256: str | None


@dataclass(frozen=True)
class Result:
    """A stored result document."""

    job_id: int
    sha256: str
    size: int
    body: bytes = field(repr=False)
    received_at: float


class Completion(Enum):
    """What complete_job() did."""

    STORED = "stored"  # first result for the job: stored, job done
    DUPLICATE = "duplicate"  # same digest as the stored result: nothing changed
    CONFLICT = "conflict"  # job already done with a different digest: refused


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


@dataclass(frozen=True)
class ActivationGrant:
    """What activation stored: the appliance and its newly issued certificate."""

    appliance: Appliance
    cert_pem: bytes


_APPLIANCE_SELECT = (
    "SELECT id, name, state, created_at, code_expires, activated_at, deactivated_at, "
    "x25519_public, cert_serial, cert_fingerprint, hybrid_public FROM appliances"
)
_JOB_SELECT = """
    SELECT j.id, a.name, j.appliance_id, j.targets, j.ports, j.engine, j.state, j.created_at,
           j.lease_expires, j.attempts, j.progress, j.completed_at, c.name, c.sealed, r.sha256
    FROM jobs j JOIN appliances a ON a.id = j.appliance_id
    LEFT JOIN credentials c ON c.id = j.credential_id
    LEFT JOIN results r ON r.job_id = j.id
"""


def _appliance(row: tuple[Any, ...]) -> Appliance:
    return Appliance(*row)


def _job(row: tuple[Any, ...]) -> JobRow:
    return JobRow(
        id=row[0],
        appliance=row[1],
        appliance_id=row[2],
        targets=json.loads(row[3]),
        ports=row[4],
        engine=row[5],
        state=row[6],
        created_at=row[7],
        lease_expires=row[8],
        attempts=row[9],
        progress=row[10],
        completed_at=row[11],
        credential_name=row[12],
        credential_sealed=row[13],
        result_sha256=row[14],
    )


class OutOfScope(StorageError):
    """A job's targets lie outside its credential's (public) scope."""


def credential_scope(sealed: bytes) -> Scope:
    """The public scope of a stored credential; StorageError when it has none or is bad."""
    try:
        header = sealing.public_header(sealed)
        if not header:
            raise StorageError(
                "it was sealed in format v1 and has no scope; re-seal it with scanner-seal "
                "(--target/--ports/--protocol) and add it under a new name"
            )
        return Scope.from_bytes(header)
    except (sealing.SealError, ScopeError) as e:
        raise StorageError(f"its public scope is unreadable ({e}); re-seal it with scanner-seal") from None


def check_job_scope(name: str, sealed: bytes, targets: list[str]) -> None:
    """Refuse a job whose targets lie outside the credential's public scope.

    Convenience for the operator and a first line of defence: the appliance enforces the
    sealed copy of the scope whatever the platform (or its database) says.
    """
    try:
        sc = credential_scope(sealed)
    except StorageError as e:
        raise OutOfScope(f"credential {name!r} cannot be used: {e}") from None
    outside = [t for t in targets if not sc.covers_job_target(t)]
    if outside:
        raise OutOfScope(
            f"targets {', '.join(outside[:5])} lie outside the scope of credential {name!r} "
            f"({', '.join(sc.targets[:5])}); drop them or re-seal the credential with a wider scope"
        )


class Storage:
    """The platform's database. Not thread-safe: use from one thread at a time."""

    def __init__(self, path: Path) -> None:
        """Open (creating if needed) and migrate the database at *path*."""
        self.path = path
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA foreign_keys = ON")
            # Deleted rows (wrapped keyslot passphrases) are overwritten with zeros, not left in
            # free pages: deactivation must really shred.
            self._db.execute("PRAGMA secure_delete = ON")
            self._db.execute("PRAGMA synchronous = FULL")
        except sqlite3.Error as e:
            raise StorageError(f"cannot open database {path}: {e}") from None
        self.migrate()

    def close(self) -> None:
        """Close the connection."""
        self._db.close()

    def __repr__(self) -> str:
        return f"Storage({str(self.path)!r})"

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        # BEGIN IMMEDIATE takes the write lock up front, so read-then-write sequences
        # (leasing, completing) cannot interleave between the server and CLI processes.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # --- schema ---

    def schema_version(self) -> int:
        """The applied schema version (PRAGMA user_version)."""
        row = self._db.execute("PRAGMA user_version").fetchone()
        return int(row[0])

    def migrate(self, upto: int = SCHEMA_VERSION) -> None:
        """Apply every migration newer than the database, up to *upto*."""
        current = self.schema_version()
        if current > SCHEMA_VERSION:
            raise StorageError(
                f"database {self.path} has schema version {current}, newer than this platform "
                f"supports ({SCHEMA_VERSION}); upgrade scanner-platform"
            )
        for version, statements in MIGRATIONS:
            if current < version <= upto:
                with self._tx() as db:
                    for sql in statements:
                        db.execute(sql)
                    db.execute(f"PRAGMA user_version = {int(version)}")
                current = version

    def journal_mode(self) -> str:
        """The SQLite journal mode ("wal")."""
        return str(self._db.execute("PRAGMA journal_mode").fetchone()[0])

    def checkpoint(self) -> None:
        """Fold the WAL into the main file and truncate it (after shredding)."""
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # --- settings & events ---

    def set_setting(self, key: str, value: Any) -> None:
        """Store a JSON-serialisable setting."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO settings (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, json.dumps(value)),
            )

    def get_setting(self, key: str) -> Any:
        """A setting, or None."""
        row = self._db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

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
            db.execute(
                "INSERT INTO events (at, appliance_id, job_id, kind, detail) VALUES (?,?,?,?,?)",
                (now, appliance_id, job_id, kind, detail),
            )

    def events(self, kind: str | None = None) -> list[tuple[float, int | None, int | None, str, str]]:
        """Audit events, oldest first: (at, appliance_id, job_id, kind, detail)."""
        sql = "SELECT at, appliance_id, job_id, kind, detail FROM events"
        args: tuple[Any, ...] = ()
        if kind is not None:
            sql += " WHERE kind = ?"
            args = (kind,)
        return [tuple(r) for r in self._db.execute(sql + " ORDER BY id", args)]

    # --- appliances ---

    def add_appliance(self, name: str, code_hash: bytes, code_expires: float, now: float) -> None:
        """Create a pending appliance with its activation code hash."""
        with self._tx() as db:
            if db.execute("SELECT 1 FROM appliances WHERE name = ?", (name,)).fetchone():
                raise Conflict(f"appliance {name!r} exists already; choose another name")
            db.execute(
                "INSERT INTO appliances (name, state, created_at, code_hash, code_expires) VALUES (?, ?, ?, ?, ?)",
                (name, STATE_PENDING, now, code_hash, code_expires),
            )
            db.execute(
                "INSERT INTO events (at, appliance_id, kind) VALUES (?, last_insert_rowid(), ?)",
                (now, "appliance_added"),
            )

    def appliance(self, name: str) -> Appliance:
        """The appliance called *name*; raise NotFound."""
        row = self._db.execute(_APPLIANCE_SELECT + " WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"no appliance named {name!r}; see 'scanner-platform appliance list'")
        return _appliance(row)

    def appliances(self) -> list[Appliance]:
        """Every appliance, by name."""
        rows = self._db.execute(_APPLIANCE_SELECT + " ORDER BY name")
        return [_appliance(r) for r in rows]

    def appliance_by_fingerprint(self, fp: str) -> Appliance | None:
        """The appliance whose current certificate has SHA-256 fingerprint *fp*."""
        row = self._db.execute(_APPLIANCE_SELECT + " WHERE cert_fingerprint = ?", (fp,)).fetchone()
        return None if row is None else _appliance(row)

    def is_revoked(self, serial: str, fp: str) -> bool:
        """True if a certificate with this serial or fingerprint was revoked."""
        row = self._db.execute("SELECT 1 FROM revoked WHERE serial = ? OR fingerprint = ?", (serial, fp)).fetchone()
        return row is not None

    def revoked(self) -> list[tuple[str, float]]:
        """The revocation list: (hex serial, revoked-at)."""
        return [
            (str(r[0]), float(r[1]))
            for r in self._db.execute("SELECT serial, revoked_at FROM revoked ORDER BY revoked_at")
        ]

    def activate(
        self,
        code_hash: bytes,
        now: float,
        x25519_public: bytes,
        issue: Callable[[str], tuple[bytes, str, str]],
        wrap_new_volume_key: Callable[[int, str], bytes],
        hybrid_public: bytes | None = None,
    ) -> ActivationGrant:
        """Redeem an activation code atomically.

        *issue(name)* returns (cert PEM, hex serial, fingerprint); *wrap_new_volume_key(id,
        name)* returns a freshly generated keyslot passphrase wrapped under the KEK. Raises
        NotFound (unknown or used code) or Conflict("expired").
        """
        with self._tx() as db:
            row = db.execute(
                _APPLIANCE_SELECT + " WHERE code_hash = ? AND state = ?",
                (code_hash, STATE_PENDING),
            ).fetchone()
            if row is None:
                raise NotFound("activation code is unknown or was used already")
            app = _appliance(row)
            if app.code_expires is None or now >= app.code_expires:
                raise Conflict("activation code has expired")
            cert_pem, serial, fp = issue(app.name)
            wrapped = wrap_new_volume_key(app.id, app.name)
            db.execute(
                "UPDATE appliances SET state = ?, code_hash = NULL, activated_at = ?, "
                "x25519_public = ?, cert_serial = ?, cert_fingerprint = ?, wrapped_volume_key = ?, "
                "hybrid_public = ? WHERE id = ?",
                (STATE_ACTIVE, now, x25519_public, serial, fp, wrapped, hybrid_public, app.id),
            )
            db.execute(
                "INSERT INTO events (at, appliance_id, kind, detail) VALUES (?, ?, ?, ?)",
                (now, app.id, "activated", f"serial={serial}"),
            )
            new = _appliance(db.execute(_APPLIANCE_SELECT + " WHERE id = ?", (app.id,)).fetchone())
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
            db.execute(
                "INSERT INTO events (at, appliance_id, kind) VALUES (?, ?, ?)",
                (now, appliance_id, "seal_key_upgraded"),
            )
        return True

    def wrapped_volume_key(self, appliance_id: int) -> bytes | None:
        """The wrapped keyslot passphrase of an active appliance, or None (never activated/shredded)."""
        row = self._db.execute(
            "SELECT wrapped_volume_key FROM appliances WHERE id = ? AND state = ?",
            (appliance_id, STATE_ACTIVE),
        ).fetchone()
        return None if row is None or row[0] is None else bytes(row[0])

    def deactivate(self, name: str, now: float) -> Appliance:
        """Shred the wrapped keyslot passphrase, revoke the certificate, drop credentials, cancel jobs."""
        with self._tx() as db:
            row = db.execute(_APPLIANCE_SELECT + " WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise NotFound(f"no appliance named {name!r}; see 'scanner-platform appliance list'")
            app = _appliance(row)
            if app.state == STATE_DEACTIVATED:
                raise Conflict(f"appliance {name!r} is deactivated already")
            if app.cert_serial is not None and app.cert_fingerprint is not None:
                db.execute(
                    "INSERT OR IGNORE INTO revoked (serial, fingerprint, appliance_id, revoked_at,"
                    " reason) VALUES (?, ?, ?, ?, ?)",
                    (app.cert_serial, app.cert_fingerprint, app.id, now, "deactivated"),
                )
            db.execute(
                "UPDATE appliances SET state = ?, deactivated_at = ?, wrapped_volume_key = NULL, "
                "code_hash = NULL WHERE id = ?",
                (STATE_DEACTIVATED, now, app.id),
            )
            db.execute(
                "UPDATE jobs SET state = 'cancelled', credential_id = NULL "
                "WHERE appliance_id = ? AND state IN ('queued', 'leased')",
                (app.id,),
            )
            db.execute("UPDATE jobs SET credential_id = NULL WHERE appliance_id = ?", (app.id,))
            db.execute("DELETE FROM credentials WHERE appliance_id = ?", (app.id,))
            db.execute(
                "INSERT INTO events (at, appliance_id, kind) VALUES (?, ?, ?)",
                (now, app.id, "deactivated"),
            )
        # Old page images of the wrapped key live on in the WAL until a checkpoint.
        self.checkpoint()
        return self.appliance(name)

    # --- sessions, clone detection, quarantine ---

    @staticmethod
    def _quarantine_policy(db: sqlite3.Connection) -> bool:
        row = db.execute("SELECT value FROM settings WHERE key = ?", (SETTING_CLONE_QUARANTINE,)).fetchone()
        return True if row is None else bool(json.loads(row[0]))

    @staticmethod
    def _is_quarantined(db: sqlite3.Connection, appliance_id: int) -> bool:
        return db.execute("SELECT 1 FROM quarantine WHERE appliance_id = ?", (appliance_id,)).fetchone() is not None

    def _suspect(self, db: sqlite3.Connection, appliance_id: int, now: float, detail: str) -> bool:
        """Record a clone suspicion; quarantine when the policy says so. True if quarantined."""
        db.execute(
            "INSERT INTO events (at, appliance_id, kind, detail) VALUES (?, ?, ?, ?)",
            (now, appliance_id, EVENT_CLONE_SUSPECTED, detail),
        )
        if not self._quarantine_policy(db):
            return False
        db.execute(
            "INSERT OR IGNORE INTO quarantine (appliance_id, since, reason) VALUES (?, ?, ?)",
            (appliance_id, now, detail),
        )
        db.execute(
            "INSERT INTO events (at, appliance_id, kind, detail) VALUES (?, ?, ?, ?)",
            (now, appliance_id, "quarantined", detail),
        )
        return True

    def open_session(
        self, appliance_id: int, token_hash: bytes, boot_counter: int, keystore: str, now: float
    ) -> SessionVerdict:
        """Register a boot. A boot counter not above every earlier one is a clone sign."""
        with self._tx() as db:
            if self._is_quarantined(db, appliance_id):
                return SessionVerdict.QUARANTINED
            row = db.execute(
                "SELECT MAX(boot_counter) FROM sessions WHERE appliance_id = ?", (appliance_id,)
            ).fetchone()
            last = row[0]
            if last is not None and boot_counter <= last:
                if self._suspect(
                    db, appliance_id, now, f"boot counter {boot_counter} is not above {last} (a copy booting?)"
                ):
                    return SessionVerdict.QUARANTINED
            db.execute("UPDATE sessions SET current = 0 WHERE appliance_id = ?", (appliance_id,))
            db.execute(
                "INSERT INTO sessions (appliance_id, token_hash, boot_counter, keystore, created_at, current) "
                "VALUES (?, ?, ?, ?, ?, 1)",
                (appliance_id, token_hash, boot_counter, keystore, now),
            )
            db.execute(
                "DELETE FROM sessions WHERE appliance_id = ? AND id NOT IN "
                "(SELECT id FROM sessions WHERE appliance_id = ? ORDER BY id DESC LIMIT ?)",
                (appliance_id, appliance_id, MAX_SESSIONS_PER_APPLIANCE),
            )
            db.execute(
                "INSERT INTO events (at, appliance_id, kind, detail) VALUES (?, ?, ?, ?)",
                (now, appliance_id, "session_opened", f"boot_counter={boot_counter} keystore={keystore}"),
            )
        return SessionVerdict.OK

    def check_session(self, appliance_id: int, token_hash: bytes, now: float) -> SessionVerdict:
        """May a request carrying this session proceed? An older session of the appliance
        being used after a newer one opened means two live instances: a clone."""
        with self._tx() as db:
            if self._is_quarantined(db, appliance_id):
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
            if self._suspect(db, appliance_id, now, detail):
                return SessionVerdict.QUARANTINED
        return SessionVerdict.OK

    def clear_quarantine(self, name: str, now: float) -> str:
        """Lift an appliance's quarantine (operator decision); returns the reason it had."""
        with self._tx() as db:
            row = db.execute("SELECT id FROM appliances WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise NotFound(f"no appliance named {name!r}; see 'scanner-platform appliance list'")
            q = db.execute("SELECT reason FROM quarantine WHERE appliance_id = ?", (row[0],)).fetchone()
            if q is None:
                raise Conflict(f"appliance {name!r} is not quarantined")
            db.execute("DELETE FROM quarantine WHERE appliance_id = ?", (row[0],))
            db.execute(
                "INSERT INTO events (at, appliance_id, kind, detail) VALUES (?, ?, ?, ?)",
                (now, row[0], "quarantine_cleared", str(q[0])),
            )
        return str(q[0])

    def clone_states(self) -> dict[int, CloneState]:
        """Quarantine and current-session facts of every appliance that has any."""
        out: dict[int, CloneState] = {}
        sessions = {
            r[0]: (r[1], r[2], r[3])
            for r in self._db.execute(
                "SELECT appliance_id, boot_counter, keystore, created_at FROM sessions WHERE current = 1"
            )
        }
        quarantined = {
            r[0]: (r[1], r[2]) for r in self._db.execute("SELECT appliance_id, since, reason FROM quarantine")
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
            )
        return out

    def renew_certificate(
        self, appliance_id: int, now: float, issue: Callable[[str], tuple[bytes, str, str]]
    ) -> bytes:
        """Issue a new client certificate and revoke the current one, atomically."""
        with self._tx() as db:
            row = db.execute(_APPLIANCE_SELECT + " WHERE id = ? AND state = ?", (appliance_id, STATE_ACTIVE)).fetchone()
            if row is None:
                raise NotFound("appliance is not active")
            app = _appliance(row)
            cert_pem, serial, fp = issue(app.name)
            if app.cert_serial is not None and app.cert_fingerprint is not None:
                db.execute(
                    "INSERT OR IGNORE INTO revoked (serial, fingerprint, appliance_id, revoked_at,"
                    " reason) VALUES (?, ?, ?, ?, ?)",
                    (app.cert_serial, app.cert_fingerprint, app.id, now, "superseded"),
                )
            db.execute(
                "UPDATE appliances SET cert_serial = ?, cert_fingerprint = ? WHERE id = ?", (serial, fp, app.id)
            )
            db.execute(
                "INSERT INTO events (at, appliance_id, kind, detail) VALUES (?, ?, ?, ?)",
                (now, app.id, "certificate_renewed", f"serial={serial} revoked={app.cert_serial}"),
            )
        return cert_pem

    # --- credentials ---

    def add_credential(self, appliance: str, name: str, sealed: bytes, now: float) -> None:
        """Store a sealed credential for an active appliance."""
        with self._tx() as db:
            row = db.execute("SELECT id, state FROM appliances WHERE name = ?", (appliance,)).fetchone()
            if row is None:
                raise NotFound(f"no appliance named {appliance!r}")
            if row[1] != STATE_ACTIVE:
                raise Conflict(f"appliance {appliance!r} is {row[1]}, not active")
            if db.execute("SELECT 1 FROM credentials WHERE appliance_id = ? AND name = ?", (row[0], name)).fetchone():
                raise Conflict(f"credential {name!r} exists already for {appliance!r}")
            db.execute(
                "INSERT INTO credentials (appliance_id, name, sealed, created_at) VALUES (?,?,?,?)",
                (row[0], name, sealed, now),
            )

    def credentials(self, appliance: str) -> list[str]:
        """Names of an appliance's credentials."""
        return [
            str(r[0])
            for r in self._db.execute(
                "SELECT c.name FROM credentials c JOIN appliances a ON a.id = c.appliance_id "
                "WHERE a.name = ? ORDER BY c.name",
                (appliance,),
            )
        ]

    # --- jobs ---

    def add_job(
        self,
        appliance: str,
        targets: list[str],
        ports: str,
        engine: str,
        credential: str | None,
        now: float,
    ) -> int:
        """Queue a job for an active appliance; returns the job id."""
        with self._tx() as db:
            row = db.execute("SELECT id, state FROM appliances WHERE name = ?", (appliance,)).fetchone()
            if row is None:
                raise NotFound(f"no appliance named {appliance!r}")
            if row[1] != STATE_ACTIVE:
                raise Conflict(f"appliance {appliance!r} is {row[1]}, not active")
            cred_id = None
            if credential is not None:
                crow = db.execute(
                    "SELECT id, sealed FROM credentials WHERE appliance_id = ? AND name = ?",
                    (row[0], credential),
                ).fetchone()
                if crow is None:
                    raise NotFound(f"appliance {appliance!r} has no credential {credential!r}")
                cred_id = crow[0]
                check_job_scope(credential, bytes(crow[1]), targets)
            cur = db.execute(
                "INSERT INTO jobs (appliance_id, targets, ports, engine, credential_id, state, "
                "created_at) VALUES (?, ?, ?, ?, ?, 'queued', ?)",
                (row[0], json.dumps(targets), ports, engine, cred_id, now),
            )
            job_id = int(cur.lastrowid or 0)
            db.execute(
                "INSERT INTO events (at, appliance_id, job_id, kind) VALUES (?, ?, ?, ?)",
                (now, row[0], job_id, "job_added"),
            )
        return job_id

    def jobs(self, appliance: str | None = None) -> list[JobRow]:
        """Jobs, oldest first (optionally of one appliance)."""
        if appliance is None:
            rows = self._db.execute(_JOB_SELECT + " ORDER BY j.id")
        else:
            rows = self._db.execute(_JOB_SELECT + " WHERE a.name = ? ORDER BY j.id", (appliance,))
        return [_job(r) for r in rows]

    def job(self, job_id: int) -> JobRow:
        """One job; raise NotFound."""
        row = self._db.execute(_JOB_SELECT + " WHERE j.id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"no job {job_id}; see 'scanner-platform job list'")
        return _job(row)

    def lease_next(self, appliance_id: int, now: float, lease_seconds: float) -> JobRow | None:
        """Lease the oldest queued (or lease-expired) job of an appliance, or None."""
        with self._tx() as db:
            row = db.execute(
                "SELECT id FROM jobs WHERE appliance_id = ? AND (state = 'queued' OR "
                "(state = 'leased' AND lease_expires <= ?)) ORDER BY id LIMIT 1",
                (appliance_id, now),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state = 'leased', lease_expires = ?, attempts = attempts + 1 WHERE id = ?",
                (now + lease_seconds, row[0]),
            )
            db.execute(
                "INSERT INTO events (at, appliance_id, job_id, kind) VALUES (?, ?, ?, ?)",
                (now, appliance_id, row[0], "leased"),
            )
            return _job(db.execute(_JOB_SELECT + " WHERE j.id = ?", (row[0],)).fetchone())

    def job_owner(self, job_id: int) -> tuple[int, str] | None:
        """(appliance id, state) of a job, or None."""
        row = self._db.execute("SELECT appliance_id, state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else (int(row[0]), str(row[1]))

    def complete_job(self, job_id: int, appliance_id: int, sha256: str, body: bytes, now: float) -> Completion:
        """Store a verified result exactly once; raise NotFound if not this appliance's job."""
        with self._tx() as db:
            row = db.execute(
                "SELECT state FROM jobs WHERE id = ? AND appliance_id = ?", (job_id, appliance_id)
            ).fetchone()
            if row is None or row[0] == "cancelled":
                raise NotFound(f"no job {job_id} for this appliance")
            if row[0] == "done":
                stored = db.execute("SELECT sha256 FROM results WHERE job_id = ?", (job_id,)).fetchone()
                return Completion.DUPLICATE if stored and stored[0] == sha256 else (Completion.CONFLICT)
            db.execute(
                "INSERT INTO results (job_id, sha256, size, body, received_at) VALUES (?,?,?,?,?)",
                (job_id, sha256, len(body), body, now),
            )
            db.execute(
                "UPDATE jobs SET state = 'done', completed_at = ?, lease_expires = NULL WHERE id = ?",
                (now, job_id),
            )
            db.execute(
                "INSERT INTO events (at, appliance_id, job_id, kind, detail) VALUES (?,?,?,?,?)",
                (now, appliance_id, job_id, "completed", f"sha256={sha256}"),
            )
        return Completion.STORED

    def set_progress(self, job_id: int, appliance_id: int, text: str, now: float) -> None:
        """Record the latest progress line of a job; raise NotFound if not the caller's."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET progress = ? WHERE id = ? AND appliance_id = ? AND state != 'cancelled'",
                (text, job_id, appliance_id),
            )
            if cur.rowcount == 0:
                raise NotFound(f"no job {job_id} for this appliance")
            db.execute(
                "INSERT INTO events (at, appliance_id, job_id, kind) VALUES (?, ?, ?, ?)",
                (now, appliance_id, job_id, "progress"),
            )

    def result(self, job_id: int) -> Result:
        """The stored result of a job; raise NotFound."""
        row = self._db.execute(
            "SELECT job_id, sha256, size, body, received_at FROM results WHERE job_id = ?",
            (job_id,),
        ).fetchone()
        if row is None:
            raise NotFound(f"job {job_id} has no result yet; see 'scanner-platform job list'")
        return Result(job_id=row[0], sha256=row[1], size=row[2], body=bytes(row[3]), received_at=row[4])

    def result_count(self, job_id: int) -> int:
        """How many results are stored for a job (0 or 1 by construction)."""
        row = self._db.execute("SELECT COUNT(*) FROM results WHERE job_id = ?", (job_id,))
        return int(row.fetchone()[0])
