"""Keyslot passphrases: the wrapped copy of each appliance, and its provable destruction.

The platform keeps each active appliance's keyslot passphrase wrapped under the KEK
(`tools/platform/keys.py`; the wire calls it the volume key, the column
``wrapped_volume_key``). Deactivation deletes it and then proves it is gone from the
database files: SQLite by checkpointing and searching the files, PostgreSQL by VACUUM FULL
and reading the table's new heap.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Final

from tools.platform.db.appliances import (
    APPLIANCE_SELECT,
    STATE_ACTIVE,
    STATE_DEACTIVATED,
    Appliance,
    Appliances,
    appliance_from_row,
    revoke_current,
)
from tools.platform.db.dialect import Conn
from tools.platform.db.errors import Conflict, NotFound, ShredUnproven
from tools.platform.db.events import add_event, put_setting, read_setting

_SHRED_PENDING: Final = "shred_pending:"  # settings key prefix: deactivation whose proof failed


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


def _deactivate_rows(db: Conn, app: Appliance, now: float) -> None:
    revoke_current(db, app, now, "deactivated")
    db.execute(
        "UPDATE appliances SET state = ?, deactivated_at = ?, wrapped_volume_key = NULL, code_hash = NULL WHERE id = ?",
        (STATE_DEACTIVATED, now, app.id),
    )
    db.execute(
        "UPDATE jobs SET state = 'cancelled', credential_id = NULL "
        "WHERE appliance_id = ? AND state IN ('queued', 'leased')",
        (app.id,),
    )
    db.execute("UPDATE jobs SET credential_id = NULL WHERE appliance_id = ?", (app.id,))
    db.execute("DELETE FROM credentials WHERE appliance_id = ?", (app.id,))
    add_event(db, now, app.id, "deactivated")


class Keyslots(Appliances):
    """The wrapped keyslot passphrases, and deactivation that shreds them."""

    def wrapped_keyslot_passphrase(self, appliance_id: int) -> bytes | None:
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
            row = db.execute(APPLIANCE_SELECT + " WHERE name = ? FOR UPDATE", (name,)).fetchone()
            if row is None:
                raise NotFound(f"no appliance named {name!r}; see 'scanner-platform appliance list'")
            app = appliance_from_row(row)
            needles: list[bytes] = []
            if app.state == STATE_DEACTIVATED:
                pending = read_setting(db, pending_key)
                if pending is None:
                    raise Conflict(f"appliance {name!r} is deactivated already")
                needles = [bytes.fromhex(pending)]
            else:
                wrapped = db.execute("SELECT wrapped_volume_key FROM appliances WHERE id = ?", (app.id,)).fetchone()
                if wrapped[0] is not None:
                    blob = bytes(wrapped[0])
                    # The whole blob, and its random nonce alone: the nonce is what a retry
                    # searches for (it is not secret; stored as hex, so it never matches
                    # its own record).
                    needles = [blob, blob[1:13]]
                    put_setting(db, pending_key, blob[1:13].hex())
                _deactivate_rows(db, app, now)
        if needles:
            self._prove_shredded(name, needles, proof_timeout)
        self.delete_setting(pending_key)
        return self.appliance(name)

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
            f"appliance {name!r} is deactivated and revoked, but its wrapped keyslot passphrase may still be "
            f"in {where}: another process holds a read transaction open; stop it (or wait) and run "
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
                row = conn.execute("SELECT pg_read_binary_file(pg_relation_filepath('appliances'))").fetchone()
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
                f"appliance {name!r} is deactivated, but its wrapped keyslot passphrase is still in the "
                f"appliances table's heap after VACUUM FULL; run 'scanner-platform appliance deactivate {name}' "
                "again"
            )
