"""The backends: opening, transactions, migrating, and the work only one backend does.

`Database` is the base every storage part (appliances, keyslots, credentials, jobs,
heartbeats, events) builds on: they call ``self._read()`` / ``self._tx()`` and never touch a
connection themselves. SQLite: one connection (``self._db``), not thread-safe. PostgreSQL:
a pool (``self._pool``), plus one LISTEN connection for job notifications.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

from tools.platform.db.dialect import POSTGRESQL, SQLITE, Conn, Dialect, is_database_url, redact_url
from tools.platform.db.errors import StorageError
from tools.platform.db.migrations import MIGRATIONS, SCHEMA_VERSION

NOTIFY_CHANNEL: Final = "scratchfs_jobs"  # PostgreSQL: payload is the appliance id
_MIGRATION_LOCK: Final = 7446510  # pg_advisory_xact_lock key: one node migrates at a time


class Database:
    """A SQLite file path or a ``postgresql://`` URL, opened and migrated.

    SQLite: ``max_concurrency`` 1 (use from one thread at a time). PostgreSQL: every method
    may be called from ``max_concurrency`` threads at once. A context manager: ``with``
    closes every connection on the way out.
    """

    def __init__(self, target: Path | str, *, pool_size: int = 16, upto: int = SCHEMA_VERSION) -> None:
        """Open (creating if needed) and migrate the database *target* (up to *upto*)."""
        self.target = target
        self._pool: Any = None
        self._listener: Any = None
        if is_database_url(target):
            self.backend = POSTGRESQL
            self.path: Path | None = None
            self.max_concurrency = pool_size
            self._open_postgres(str(target), pool_size)
        else:
            self.backend = SQLITE
            self.path = Path(target)
            self.max_concurrency = 1
            self._open_sqlite(self.path)
        self._dialect = Dialect(self.backend)
        try:
            self.migrate(upto)
        except BaseException:
            self.close()
            raise

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

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        shown = redact_url(str(self.target)) if self.backend == POSTGRESQL else str(self.target)
        return f"Storage({shown!r})"

    @contextmanager
    def _read(self) -> Iterator[Conn]:
        if self._pool is None:
            yield Conn(self._db, self._dialect)
            return
        with self._pool.connection() as conn:
            yield Conn(conn, self._dialect)

    @contextmanager
    def _tx(self) -> Iterator[Conn]:
        if self._pool is None:
            # BEGIN IMMEDIATE takes the write lock up front, so read-then-write sequences
            # (leasing, completing) cannot interleave between the server and CLI processes.
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield Conn(self._db, self._dialect)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return
        with self._pool.connection() as conn, conn.transaction():
            yield Conn(conn, self._dialect)

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
                        db.execute(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
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
            return POSTGRESQL
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

    def _notify_job(self, db: Conn, appliance_id: int) -> None:
        # PostgreSQL delivers the NOTIFY at commit, to every node's LISTEN connection.
        if self._pool is not None:
            db.execute("SELECT pg_notify(?, ?)", (NOTIFY_CHANNEL, str(appliance_id)))

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
