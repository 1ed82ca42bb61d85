"""Storage: one `Storage` class, two backends (SQLite in WAL mode, PostgreSQL), one migration list.

This package is the only place that knows SQL. Every method is one transaction, so server
processes (one or many nodes) and CLI processes can use the same database at once. SQLite
is the embedded default (a file in the state directory); PostgreSQL is the production
backend (a ``postgresql://`` URL given to ``init --database``), with a connection pool so
that many requests run at once, and NOTIFY so that long-polls on every node wake when a job
is queued. `Storage` is a context manager: ``with state.open_storage(paths) as storage:``.

Split by what it stores, each part a class over `connection.Database`:
- `connection`  opening, transactions, migrating, backend-only work (checkpoint, NOTIFY)
- `dialect`     the ONE place SQLite and PostgreSQL differ; `migrations` the schema
- `events`      settings and the audit log
- `appliances`  appliance rows, activation, certificates, revocation
- `sessions`    boot sessions, clone detection, quarantine; `attestation` enrolled TPMs, PCR baselines, nonces
- `keyslots`    wrapped volume-key parts (passphrase or split shares), rotation, and
                deactivation that provably shreds them
- `credentials` sealed credentials; `jobs` jobs and results; `heartbeats` heartbeats, health
Policy (which jobs a credential may serve) is not storage: `tools/platform/policy.py`.

Portable-SQL rules (every migration and every method is written ONCE, for both backends;
`dialect.Dialect` translates the few differences):
- A method reads inside ``with self._read() as db:`` and writes inside ``with self._tx() as
  db:`` (one transaction), calling ``db.execute(sql, args)``; never touch a connection
  directly (``self._db`` exists only for SQLite, PostgreSQL uses a pool).
- Placeholders are ``?``; never write ``%`` (PostgreSQL's driver uses ``%s``; the dialect
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
  work (checkpoint, vacuum, notify) lives in `connection` (and the shredding proof).
- Migrations are append-only: add ``(N + 1, [statements])`` at the end, never edit one
  that shipped. The applied version is ``PRAGMA user_version`` on SQLite and the
  ``schema_version`` table on PostgreSQL; a database written by a newer platform is
  refused instead of being silently misread.
"""

from __future__ import annotations

from tools.platform.db.appliances import (
    STATE_ACTIVE,
    STATE_DEACTIVATED,
    STATE_PENDING,
    ActivationGrant,
    Appliance,
)
from tools.platform.db.attestation import (
    ATTEST_ATTESTED,
    ATTEST_ENROLLING,
    PCR_MISMATCH,
    PCR_OK,
    SETTING_EK_CA,
    Attestation,
    Attestations,
)
from tools.platform.db.connection import NOTIFY_CHANNEL
from tools.platform.db.credentials import Credentials
from tools.platform.db.dialect import Dialect as _Dialect
from tools.platform.db.dialect import is_database_url, redact_url
from tools.platform.db.errors import Conflict, NotFound, ShredUnproven, StorageError
from tools.platform.db.heartbeats import (
    HEALTH_DEACTIVATED,
    HEALTH_LATE,
    HEALTH_MISSING,
    HEALTH_OK,
    HEALTH_PENDING,
    HEALTH_QUARANTINED,
    HEARTBEAT_HISTORY,
    Health,
    Heartbeats,
)
from tools.platform.db.jobs import Completion, JobRow, Jobs, Result
from tools.platform.db.keyslots import (
    MAX_EPOCH,
    SCHEME_PASSPHRASE,
    SCHEME_SPLIT,
    Keyslots,
    KeyState,
    VolumeKeyRecord,
)
from tools.platform.db.migrations import MIGRATIONS, SCHEMA_VERSION
from tools.platform.db.sessions import (
    CLEAR_NEXT_BOOT,
    EVENT_CLONE_SUSPECTED,
    MAX_SESSIONS_PER_APPLIANCE,
    SETTING_CLONE_QUARANTINE,
    CloneState,
    SessionRow,
    Sessions,
    SessionVerdict,
)
from tools.platform.policy import OutOfScope


class Storage(Keyslots, Sessions, Attestations, Credentials, Jobs, Heartbeats):
    """The platform's database: a SQLite file path or a ``postgresql://`` URL.

    SQLite: one connection, not thread-safe (``max_concurrency`` 1: use from one thread
    at a time). PostgreSQL: a pool; every method may be called from ``max_concurrency``
    threads at once. ``with Storage(...) as s:`` closes it on the way out.
    """


__all__ = [
    "ATTEST_ATTESTED",
    "ATTEST_ENROLLING",
    "CLEAR_NEXT_BOOT",
    "EVENT_CLONE_SUSPECTED",
    "HEALTH_DEACTIVATED",
    "HEALTH_LATE",
    "HEALTH_MISSING",
    "HEALTH_OK",
    "HEALTH_PENDING",
    "HEALTH_QUARANTINED",
    "HEARTBEAT_HISTORY",
    "MAX_EPOCH",
    "MAX_SESSIONS_PER_APPLIANCE",
    "MIGRATIONS",
    "NOTIFY_CHANNEL",
    "PCR_MISMATCH",
    "PCR_OK",
    "SCHEMA_VERSION",
    "SCHEME_PASSPHRASE",
    "SCHEME_SPLIT",
    "SETTING_CLONE_QUARANTINE",
    "SETTING_EK_CA",
    "STATE_ACTIVE",
    "STATE_DEACTIVATED",
    "STATE_PENDING",
    "ActivationGrant",
    "Appliance",
    "Attestation",
    "CloneState",
    "Completion",
    "Conflict",
    "Health",
    "JobRow",
    "KeyState",
    "NotFound",
    "OutOfScope",
    "Result",
    "SessionRow",
    "SessionVerdict",
    "ShredUnproven",
    "Storage",
    "StorageError",
    "VolumeKeyRecord",
    "_Dialect",
    "is_database_url",
    "redact_url",
]
