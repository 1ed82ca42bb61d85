"""Storage: one class, two backends (SQLite in WAL mode, PostgreSQL), one migration list.

`Storage` is the only place that knows SQL. Every method is one transaction, so server
processes (one or many nodes) and CLI processes can use the same database at once. SQLite
is the embedded default (a file in the state directory); PostgreSQL is the production
backend (a ``postgresql://`` URL given to ``init --database``), with a connection pool so
that many requests run at once, and NOTIFY so that long-polls on every node wake when a job
is queued.

Portable-SQL rules (every migration and every Storage method is written ONCE, for both
backends; `_Dialect` translates the few differences):
- A method reads inside ``with self._read() as db:`` and writes inside ``with self._tx() as
  db:`` (one transaction), calling ``db.execute(sql, args)``; never touch a connection
  directly (``self._db`` exists only for SQLite, PostgreSQL uses a pool).
- Placeholders are ``?``; never write ``%`` (PostgreSQL's driver uses ``%s``; `_Dialect`
  rewrites ``?`` and escapes ``%``).
- Types: ``INTEGER PRIMARY KEY`` (an auto-assigned id: identity on PostgreSQL),
  ``INTEGER`` (64-bit on both: BIGINT on PostgreSQL), ``REAL`` (DOUBLE PRECISION),
  ``BLOB`` (BYTEA), ``TEXT``. No other type names, no AUTOINCREMENT.
- New ids come back with ``INSERT ... RETURNING id`` (not lastrowid/last_insert_rowid()).
- Upserts and ignores use ``ON CONFLICT (...) DO UPDATE/NOTHING``, never ``INSERT OR ...``.
- A read-then-write on a row that another node may write at the same time selects it with
  ``FOR UPDATE`` (or ``FOR UPDATE SKIP LOCKED`` to take the next free one); SQLite drops
  the clause, its ``BEGIN IMMEDIATE`` already serialises writers.
- No PRAGMA, no SQLite/PostgreSQL-only functions in migrations or queries; backend-only
  work (checkpoint, vacuum, notify) lives in the backend classes below.
- Migrations are append-only: add ``(N + 1, [statements])`` at the end, never edit one
  that shipped. The applied version is ``PRAGMA user_version`` on SQLite and the
  ``schema_version`` table on PostgreSQL; a database written by a newer platform is
  refused instead of being silently misread.
"""

from __future__ import annotations

import hmac
import json
import re
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Final, Protocol

from protocol import api, sealing
from protocol.scope import Scope, ScopeError
from tools.platform import db_attestation
from tools.platform.db_attestation import Attestations

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
    (
        5,
        [
            # Heartbeats: the latest status per appliance, the health state last recorded
            # by the evaluator (its compare-and-set makes each transition happen once),
            # and a bounded history (HEARTBEAT_HISTORY rows per appliance).
            """CREATE TABLE appliance_health (
                appliance_id INTEGER PRIMARY KEY REFERENCES appliances(id),
                last_seen REAL,
                status TEXT,
                health TEXT NOT NULL DEFAULT 'ok',
                health_since REAL NOT NULL
            )""",
            """CREATE TABLE heartbeats (
                id INTEGER PRIMARY KEY,
                appliance_id INTEGER NOT NULL REFERENCES appliances(id),
                received_at REAL NOT NULL,
                status TEXT NOT NULL
            )""",
            "CREATE INDEX heartbeats_by_appliance ON heartbeats (appliance_id, id)",
            # No quarantine column: the health state "quarantined" is derived from the
            # quarantine table of migration 4 (Storage.quarantined_at and health()).
        ],
    ),
    (
        6,
        [
            # The long-poll waker asks "which appliances have a leasable job" once per
            # sweep; without this index that is a scan of every job ever queued.
            "CREATE INDEX jobs_by_state ON jobs (state, lease_expires, appliance_id)",
        ],
    ),
    # Remote attestation: enrolled TPMs, PCR baselines, session nonces (db_attestation).
    (7, db_attestation.MIGRATION),
]
NOTIFY_CHANNEL: Final = "scratchfs_jobs"  # PostgreSQL: payload is the appliance id
SCHEMA_VERSION: Final = MIGRATIONS[-1][0]

STATE_PENDING: Final = "pending"
STATE_ACTIVE: Final = "active"
STATE_DEACTIVATED: Final = "deactivated"
# Sessions kept per appliance: enough to recognise a clone replaying a recent session, and
# bounded so that a rebooting (or malicious) appliance cannot grow the table without limit.
MAX_SESSIONS_PER_APPLIANCE: Final = 32
SETTING_CLONE_QUARANTINE: Final = "clone_quarantine"  # bool, default True
EVENT_CLONE_SUSPECTED: Final = "clone_suspected"

# Health states shown by `appliance list` (pending appliances show "pending").
HEALTH_OK: Final = "ok"
HEALTH_LATE: Final = "late"
HEALTH_MISSING: Final = "missing"
HEALTH_QUARANTINED: Final = "quarantined"
HEALTH_DEACTIVATED: Final = "deactivated"
HEALTH_PENDING: Final = "pending"
HEARTBEAT_HISTORY: Final = 100  # heartbeats kept per appliance (older ones are deleted)


class StorageError(Exception):
    """A storage problem the operator can act on (the message says what to do)."""


class Conflict(StorageError):
    """The object exists already, or the request contradicts the stored state."""


class NotFound(StorageError):
    """No such appliance, job or credential."""


class ShredUnproven(StorageError):
    """Deactivation committed, but the wrapped key could not be shown gone from every
    database file; the message says what to do (the command then exits non-zero)."""


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


@dataclass(frozen=True)
class ActivationGrant:
    """What activation stored: the appliance and its newly issued certificate."""

    appliance: Appliance
    cert_pem: bytes


_SHRED_PENDING: Final = "shred_pending:"  # settings key prefix: deactivation whose proof failed

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


def _files_holding(db_path: Path, needles: list[bytes]) -> list[str]:
    """Names of the SQLite files (main, -wal, -journal) that contain any of *needles*.

    Read in 1 MiB chunks overlapping by the longest needle, so a database of any size is
    searched in bounded memory and a needle across a chunk boundary is still found.
    """
    overlap = max(len(n) for n in needles) - 1
    found = []
    for suffix in ("", "-wal", "-journal"):
        p = Path(str(db_path) + suffix)
        try:
            f = p.open("rb")
        except FileNotFoundError:
            continue
        with f:
            tail = b""
            while chunk := f.read(1024 * 1024):
                window = tail + chunk
                if any(n in window for n in needles):
                    found.append(p.name)
                    break
                tail = window[-overlap:] if overlap else b""
    return found


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
        credential_sealed=None if row[13] is None else bytes(row[13]),
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


class _Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def __iter__(self) -> Iterator[Any]: ...


class _Dialect:
    """The only place that knows how the two SQL dialects differ (see the module rules)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._cache: dict[str, str] = {}

    def query(self, sql: str) -> str:
        """A portable statement in this dialect."""
        out = self._cache.get(sql)
        if out is None:
            if self.name == "postgresql":
                out = sql.replace("%", "%%").replace("?", "%s")
            else:
                out = re.sub(r"\s+FOR UPDATE( SKIP LOCKED)?\b", "", sql)
            self._cache[sql] = out
        return out

    def ddl(self, sql: str) -> str:
        """A portable migration statement in this dialect."""
        if self.name != "postgresql":
            return sql
        sql = re.sub(r"\bINTEGER PRIMARY KEY\b", "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", sql)
        sql = re.sub(r"\bINTEGER\b", "BIGINT", sql)
        sql = re.sub(r"\bREAL\b", "DOUBLE PRECISION", sql)
        return re.sub(r"\bBLOB\b", "BYTEA", sql)


class _Conn:
    """A connection seen through the dialect: ``execute(portable_sql, args)``."""

    def __init__(self, raw: Any, dialect: _Dialect) -> None:
        self._raw = raw
        self._dialect = dialect

    def execute(self, sql: str, args: Sequence[Any] = ()) -> _Cursor:
        return self._raw.execute(self._dialect.query(sql), tuple(args))  # type: ignore[no-any-return]


def is_database_url(target: str | Path) -> bool:
    """True if *target* names a PostgreSQL database rather than a SQLite file."""
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


def redact_url(url: str) -> str:
    """*url* without its password (for messages and logs)."""
    return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", url)


class Storage(Attestations):
    """The platform's database: a SQLite file path or a ``postgresql://`` URL.

    SQLite: one connection, not thread-safe (``max_concurrency`` 1: use from one thread
    at a time). PostgreSQL: a pool; every method may be called from ``max_concurrency``
    threads at once.
    """

    def __init__(self, target: Path | str, *, pool_size: int = 16, upto: int = SCHEMA_VERSION) -> None:
        """Open (creating if needed) and migrate the database *target* (up to *upto*)."""
        self.target = target
        self._pool: Any = None
        self._listener: Any = None
        if is_database_url(target):
            self.backend = "postgresql"
            self.path: Path | None = None
            self.max_concurrency = pool_size
            self._open_postgres(str(target), pool_size)
        else:
            self.backend = "sqlite"
            self.path = Path(target)
            self.max_concurrency = 1
            self._open_sqlite(self.path)
        self._dialect = _Dialect(self.backend)
        self.migrate(upto)

    # --- backend plumbing ---

    def _open_sqlite(self, path: Path) -> None:
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

    def _open_postgres(self, url: str, pool_size: int) -> None:
        import psycopg
        import psycopg_pool

        try:
            self._pool = psycopg_pool.ConnectionPool(
                url,
                min_size=1,
                max_size=pool_size,
                kwargs={"autocommit": True},
                open=False,
                name="scanner-platform",
            )
            self._pool.open(wait=True, timeout=10.0)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as e:
            if self._pool is not None:
                self._pool.close()
            raise StorageError(
                f"cannot connect to database {redact_url(url)}: {type(e).__name__}; check the URL and that "
                "the server is running"
            ) from None

    def close(self) -> None:
        """Close every connection."""
        if self._pool is not None:
            self._pool.close()
            if self._listener is not None:
                self._listener.close()
        else:
            self._db.close()

    def __repr__(self) -> str:
        shown = redact_url(str(self.target)) if self.backend == "postgresql" else str(self.target)
        return f"Storage({shown!r})"

    @contextmanager
    def _read(self) -> Iterator[_Conn]:
        if self._pool is None:
            yield _Conn(self._db, self._dialect)
            return
        with self._pool.connection() as conn:
            yield _Conn(conn, self._dialect)

    @contextmanager
    def _tx(self) -> Iterator[_Conn]:
        if self._pool is None:
            # BEGIN IMMEDIATE takes the write lock up front, so read-then-write sequences
            # (leasing, completing) cannot interleave between the server and CLI processes.
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield _Conn(self._db, self._dialect)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return
        with self._pool.connection() as conn, conn.transaction():
            yield _Conn(conn, self._dialect)

    # --- schema ---

    def schema_version(self) -> int:
        """The applied schema version."""
        if self._pool is None:
            return int(self._db.execute("PRAGMA user_version").fetchone()[0])
        with self._read() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT max(version) FROM schema_version").fetchone()
        return int(row[0] or 0)

    def migrate(self, upto: int = SCHEMA_VERSION) -> None:
        """Apply every migration newer than the database, up to *upto*."""
        current = self.schema_version()
        if current > SCHEMA_VERSION:
            raise StorageError(
                f"database {self!r} has schema version {current}, newer than this platform "
                f"supports ({SCHEMA_VERSION}); upgrade scanner-platform"
            )
        for version, statements in MIGRATIONS:
            if current < version <= upto:
                with self._tx() as db:
                    if self._pool is not None:
                        # Several nodes may start at once: one migrates, the others wait
                        # and then find the work done.
                        db.execute("SELECT pg_advisory_xact_lock(7446510)")
                        row = db.execute("SELECT max(version) FROM schema_version").fetchone()
                        if int(row[0] or 0) >= version:
                            current = version
                            continue
                    for sql in statements:
                        db.execute(self._dialect.ddl(sql))
                    if self._pool is None:
                        db.execute(f"PRAGMA user_version = {int(version)}")
                    else:
                        db.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
                current = version

    def journal_mode(self) -> str:
        """The SQLite journal mode ("wal"); "postgresql" for that backend."""
        if self._pool is not None:
            return "postgresql"
        return str(self._db.execute("PRAGMA journal_mode").fetchone()[0])

    def checkpoint(self) -> bool:
        """SQLite: fold the WAL into the main file and truncate it; False if a reader kept
        it from completing (PostgreSQL: always True, nothing to do here)."""
        if self._pool is not None:
            return True
        busy, _log, _done = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        return int(busy) == 0

    def execute_for_tests(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one portable statement in its own transaction; its rows, if it returns any
        (tests plant and inspect states with it, on either backend)."""
        with self._tx() as db:
            cur = db.execute(sql, args)
            return [tuple(r) for r in cur.fetchall()] if getattr(cur, "description", None) else []

    # --- change signals for long-polls ---

    @property
    def has_notifications(self) -> bool:
        """True if the backend pushes job notifications (PostgreSQL LISTEN/NOTIFY)."""
        return self._pool is not None

    def change_token(self) -> int:
        """SQLite: a number that changes when another connection commits (data_version)."""
        if self._pool is not None:
            return 0
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def wait_job_notifications(self, timeout: float) -> set[int]:
        """PostgreSQL: block up to *timeout* s for NOTIFYs of queued jobs; their appliance ids.

        Runs on its own connection (LISTEN is per session), outside the pool, and must be
        called from one thread at a time.
        """
        import psycopg

        if self._listener is None:
            self._listener = psycopg.Connection.connect(str(self.target), autocommit=True)
            self._listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        ids: set[int] = set()
        try:
            for note in self._listener.notifies(timeout=timeout, stop_after=1):
                ids.add(int(note.payload))
            # Drain what arrived together with the first one, without waiting again.
            for note in self._listener.notifies(timeout=0.0):
                ids.add(int(note.payload))
        except psycopg.OperationalError:
            # The listener's connection broke: reconnect next time; the sweep covers the gap.
            self._listener.close()
            self._listener = None
            time.sleep(min(timeout, 1.0))
        return ids

    def leasable_appliances(self, now: float) -> set[int]:
        """Appliances with a queued (or lease-expired) job."""
        with self._read() as db:
            rows = db.execute(
                "SELECT DISTINCT appliance_id FROM jobs WHERE state = 'queued' OR "
                "(state = 'leased' AND lease_expires <= ?)",
                (now,),
            ).fetchall()
        return {int(r[0]) for r in rows}

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
        with self._read() as db:
            row = db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
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
        with self._read() as db:
            return [tuple(r) for r in db.execute(sql + " ORDER BY id", args)]

    # --- appliances ---

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
            db.execute(
                "INSERT INTO events (at, appliance_id, kind) VALUES (?, ?, ?)",
                (now, row[0], "appliance_added"),
            )

    def appliance(self, name: str) -> Appliance:
        """The appliance called *name*; raise NotFound."""
        with self._read() as db:
            row = db.execute(_APPLIANCE_SELECT + " WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"no appliance named {name!r}; see 'scanner-platform appliance list'")
        return _appliance(row)

    def appliances(self) -> list[Appliance]:
        """Every appliance, by name."""
        with self._read() as db:
            return [_appliance(r) for r in db.execute(_APPLIANCE_SELECT + " ORDER BY name")]

    def appliance_by_fingerprint(self, fp: str) -> Appliance | None:
        """The appliance whose current certificate has SHA-256 fingerprint *fp*."""
        with self._read() as db:
            row = db.execute(_APPLIANCE_SELECT + " WHERE cert_fingerprint = ?", (fp,)).fetchone()
        return None if row is None else _appliance(row)

    def identify(self, serial: str, fp: str) -> tuple[bool, Appliance | None]:
        """(revoked?, appliance of this certificate) in one round trip to the database."""
        with self._read() as db:
            revoked = db.execute("SELECT 1 FROM revoked WHERE serial = ? OR fingerprint = ?", (serial, fp)).fetchone()
            row = db.execute(_APPLIANCE_SELECT + " WHERE cert_fingerprint = ?", (fp,)).fetchone()
        return revoked is not None, None if row is None else _appliance(row)

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
                _APPLIANCE_SELECT + " WHERE code_hash = ? AND state = ? FOR UPDATE",
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
        with self._read() as db:
            row = db.execute(
                "SELECT wrapped_volume_key FROM appliances WHERE id = ? AND state = ?",
                (appliance_id, STATE_ACTIVE),
            ).fetchone()
        return None if row is None or row[0] is None else bytes(row[0])

    def deactivate(self, name: str, now: float, *, proof_timeout: float = 5.0) -> Appliance:
        """Shred the wrapped keyslot passphrase, revoke the certificate, drop credentials, cancel jobs,
        then prove the wrapped key is gone from the database files (ShredUnproven if not).

        Calling it again for an appliance deactivated earlier whose proof failed retries
        the proof (and only that).
        """
        pending_key = f"{_SHRED_PENDING}{name}"
        with self._tx() as db:
            row = db.execute(_APPLIANCE_SELECT + " WHERE name = ? FOR UPDATE", (name,)).fetchone()
            if row is None:
                raise NotFound(f"no appliance named {name!r}; see 'scanner-platform appliance list'")
            app = _appliance(row)
            needles: list[bytes] = []
            if app.state == STATE_DEACTIVATED:
                pending = db.execute("SELECT value FROM settings WHERE key = ?", (pending_key,)).fetchone()
                if pending is None:
                    raise Conflict(f"appliance {name!r} is deactivated already")
                needles = [bytes.fromhex(json.loads(pending[0]))]
            else:
                wrapped = db.execute("SELECT wrapped_volume_key FROM appliances WHERE id = ?", (app.id,)).fetchone()
                if wrapped[0] is not None:
                    blob = bytes(wrapped[0])
                    # The whole blob, and its random nonce alone: the nonce is what a retry
                    # searches for (it is not secret; stored as hex, so it never matches
                    # its own record).
                    needles = [blob, blob[1:13]]
                    db.execute(
                        "INSERT INTO settings (key, value) VALUES (?, ?) "
                        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                        (pending_key, json.dumps(blob[1:13].hex())),
                    )
                self._deactivate_rows(db, app, now)
        if needles:
            self._prove_shredded(name, needles, proof_timeout)
        self.delete_setting(pending_key)
        return self.appliance(name)

    @staticmethod
    def _revoke_current(db: _Conn, app: Appliance, now: float, reason: str) -> None:
        """Revoke the appliance's current certificate, if it has one (idempotent)."""
        if app.cert_serial is not None and app.cert_fingerprint is not None:
            db.execute(
                "INSERT INTO revoked (serial, fingerprint, appliance_id, revoked_at, reason) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (serial) DO NOTHING",
                (app.cert_serial, app.cert_fingerprint, app.id, now, reason),
            )

    @staticmethod
    def _deactivate_rows(db: _Conn, app: Appliance, now: float) -> None:
        Storage._revoke_current(db, app, now, "deactivated")
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

    def _prove_shredded(self, name: str, needles: list[bytes], timeout: float) -> None:
        if self._pool is not None:
            self._prove_shredded_postgres(name, needles)
            return
        assert self.path is not None
        # Old page images of the wrapped key live on in the WAL (and the main file keeps
        # the old page) until a checkpoint completes, which an open reader prevents:
        # retry for a while, then search the files themselves.
        deadline = time.monotonic() + timeout
        self._db.execute("PRAGMA busy_timeout = 100")
        try:
            while True:
                complete = self.checkpoint()
                found = _files_holding(self.path, needles)
                if complete and not found:
                    return
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.1)
        finally:
            self._db.execute("PRAGMA busy_timeout = 30000")
        where = ", ".join(found) if found else "the WAL (checkpoint incomplete)"
        raise ShredUnproven(
            f"appliance {name!r} is deactivated and revoked, but its wrapped volume key may still be in {where}: "
            "another process holds a read transaction open; stop it (or wait) and run "
            f"'scanner-platform appliance deactivate {name}' again to finish the proof"
        )

    def _prove_shredded_postgres(self, name: str, needles: list[bytes]) -> None:
        import psycopg

        # VACUUM FULL rewrites the table into new files and drops the old ones, so no dead
        # tuple of the row survives in the table's heap; then read the new heap file.
        # WAL segments, archives, replicas and backups are out of our reach (docs/platform.md).
        try:
            with self._pool.connection() as conn:
                conn.execute("VACUUM FULL appliances")
                row = conn.execute(
                    "SELECT pg_read_binary_file(pg_relation_filepath('appliances'))"
                ).fetchone()
        except psycopg.errors.InsufficientPrivilege:
            raise ShredUnproven(
                f"appliance {name!r} is deactivated and revoked, but the platform's database role may not "
                "rewrite or read the appliances table's file, so destruction is unproven; grant it "
                "ownership of the table and the pg_read_server_files role, then run "
                f"'scanner-platform appliance deactivate {name}' again"
            ) from None
        heap = bytes(row[0])
        if any(n in heap for n in needles):
            raise ShredUnproven(
                f"appliance {name!r} is deactivated, but its wrapped volume key is still in the appliances "
                f"table's heap after VACUUM FULL; run 'scanner-platform appliance deactivate {name}' again"
            )
    # --- sessions, clone detection, quarantine ---

    @staticmethod
    def _quarantine_policy(db: _Conn) -> bool:
        row = db.execute("SELECT value FROM settings WHERE key = ?", (SETTING_CLONE_QUARANTINE,)).fetchone()
        return True if row is None else bool(json.loads(row[0]))

    @staticmethod
    def _quarantined_since(db: _Conn, appliance_id: int) -> float | None:
        # The one per-appliance read of the quarantine table (sessions, heartbeats, health).
        row = db.execute("SELECT since FROM quarantine WHERE appliance_id = ?", (appliance_id,)).fetchone()
        return None if row is None else float(row[0])

    @classmethod
    def _is_quarantined(cls, db: _Conn, appliance_id: int) -> bool:
        return cls._quarantined_since(db, appliance_id) is not None

    def _suspect(self, db: _Conn, appliance_id: int, now: float, detail: str) -> bool:
        """Record a clone suspicion; quarantine when the policy says so. True if quarantined."""
        db.execute(
            "INSERT INTO events (at, appliance_id, kind, detail) VALUES (?, ?, ?, ?)",
            (now, appliance_id, EVENT_CLONE_SUSPECTED, detail),
        )
        if not self._quarantine_policy(db):
            return False
        db.execute(
            # Portable upsert (PostgreSQL too): the first suspicion's time and reason stay.
            "INSERT INTO quarantine (appliance_id, since, reason) VALUES (?, ?, ?) "
            "ON CONFLICT (appliance_id) DO NOTHING",
            (appliance_id, now, detail),
        )
        db.execute(
            "INSERT INTO events (at, appliance_id, kind, detail) VALUES (?, ?, ?, ?)",
            (now, appliance_id, "quarantined", detail),
        )
        return True

    def open_session(
        self, appliance_id: int, token_hash: bytes, boot_counter: int, keystore: str, now: float,
        *, attested: bool = False, public_id: str | None = None,
    ) -> SessionVerdict:
        """Register a boot. A boot counter not above every earlier one (a second copy
        booting), or far above the last (a forged one, api.MAX_BOOT_COUNTER_STEP), is a clone sign."""
        with self._tx() as db:
            if self._is_quarantined(db, appliance_id):
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
            if detail is not None and self._suspect(db, appliance_id, now, detail):
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
            db.execute(
                "INSERT INTO events (at, appliance_id, kind, detail) VALUES (?, ?, ?, ?)",
                (
                    now, appliance_id, "session_opened",
                    f"boot_counter={boot_counter} keystore={keystore} attested={'yes' if attested else 'no'}",
                ),
            )  # fmt: skip
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
            db.execute(
                "INSERT INTO events (at, appliance_id, kind, detail) VALUES (?, ?, ?, ?)",
                (now, app_id, "quarantine_cleared", f"{q[0]}; decision: {decision}"),
            )
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
                r[0]: (r[1], r[2])
                for r in db.execute("SELECT appliance_id, since, reason FROM quarantine").fetchall()
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
            self._revoke_current(db, app, now, "superseded")
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
        with self._read() as db:
            return [
                str(r[0])
                for r in db.execute(
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
            job_id = int(
                db.execute(
                    "INSERT INTO jobs (appliance_id, targets, ports, engine, credential_id, state, "
                    "created_at) VALUES (?, ?, ?, ?, ?, 'queued', ?) RETURNING id",
                    (row[0], json.dumps(targets), ports, engine, cred_id, now),
                ).fetchone()[0]
            )
            db.execute(
                "INSERT INTO events (at, appliance_id, job_id, kind) VALUES (?, ?, ?, ?)",
                (now, row[0], job_id, "job_added"),
            )
            self._notify_job(db, int(row[0]))
        return job_id

    def _notify_job(self, db: _Conn, appliance_id: int) -> None:
        # PostgreSQL delivers the NOTIFY at commit, to every node's LISTEN connection.
        if self._pool is not None:
            db.execute("SELECT pg_notify(?, ?)", (NOTIFY_CHANNEL, str(appliance_id)))

    def jobs(self, appliance: str | None = None) -> list[JobRow]:
        """Jobs, oldest first (optionally of one appliance)."""
        with self._read() as db:
            if appliance is None:
                rows = db.execute(_JOB_SELECT + " ORDER BY j.id").fetchall()
            else:
                rows = db.execute(_JOB_SELECT + " WHERE a.name = ? ORDER BY j.id", (appliance,)).fetchall()
        return [_job(r) for r in rows]

    def job(self, job_id: int) -> JobRow:
        """One job; raise NotFound."""
        with self._read() as db:
            row = db.execute(_JOB_SELECT + " WHERE j.id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"no job {job_id}; see 'scanner-platform job list'")
        return _job(row)

    def lease_next(self, appliance_id: int, now: float, lease_seconds: float) -> JobRow | None:
        """Lease the oldest queued (or lease-expired) job of an appliance, or None.

        Exactly once across nodes: the row is taken with FOR UPDATE SKIP LOCKED, so two
        nodes leasing at once get different jobs (or none), never the same one.
        """
        with self._tx() as db:
            row = db.execute(
                "SELECT id FROM jobs WHERE appliance_id = ? AND (state = 'queued' OR "
                "(state = 'leased' AND lease_expires <= ?)) ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED",
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
        with self._read() as db:
            row = db.execute("SELECT appliance_id, state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else (int(row[0]), str(row[1]))

    def complete_job(self, job_id: int, appliance_id: int, sha256: str, body: bytes, now: float) -> Completion:
        """Store a verified result exactly once; raise NotFound if not this appliance's job.

        The job row is locked (FOR UPDATE) first, so two nodes completing the same job at
        once serialise: the second sees 'done' and compares digests.
        """
        with self._tx() as db:
            row = db.execute(
                "SELECT state FROM jobs WHERE id = ? AND appliance_id = ? FOR UPDATE", (job_id, appliance_id)
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
        with self._read() as db:
            row = db.execute(
                "SELECT job_id, sha256, size, body, received_at FROM results WHERE job_id = ?",
                (job_id,),
            ).fetchone()
        if row is None:
            raise NotFound(f"job {job_id} has no result yet; see 'scanner-platform job list'")
        return Result(job_id=row[0], sha256=row[1], size=row[2], body=bytes(row[3]), received_at=row[4])

    # --- heartbeats and health ---

    def quarantined_at(self, appliance_id: int) -> float | None:
        """Since when the appliance is quarantined (clone detection's quarantine table), or None."""
        with self._read() as db:
            return self._quarantined_since(db, appliance_id)

    def session_boot_counter(self, appliance_id: int, token_hash: bytes) -> int | None:
        """The boot counter a session of this appliance was opened with (None: unknown)."""
        with self._read() as db:
            row = db.execute(
                "SELECT boot_counter FROM sessions WHERE appliance_id = ? AND token_hash = ?",
                (appliance_id, token_hash),
            ).fetchone()
        return None if row is None else int(row[0])

    def record_heartbeat(self, appliance_id: int, status: dict[str, Any], now: float) -> None:
        """Store the latest status and append it to the bounded history."""
        doc = json.dumps(status, sort_keys=True, separators=(",", ":"))
        with self._tx() as db:
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
            db.execute(
                "INSERT INTO events (at, appliance_id, kind, detail) VALUES (?, ?, ?, ?)",
                (now, appliance_id, event_kind, detail),
            )
        return True

    def result_count(self, job_id: int) -> int:
        """How many results are stored for a job (0 or 1 by construction)."""
        with self._read() as db:
            return int(db.execute("SELECT COUNT(*) FROM results WHERE job_id = ?", (job_id,)).fetchone()[0])
