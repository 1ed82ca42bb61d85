"""Volume keys: each appliance's wrapped part of its volume key, and its provable destruction.

Two schemes live side by side (migration 7). ``passphrase``: the platform keeps the keyslot
passphrase itself wrapped under the KEK (`tools/platform/keys.py`; the wire calls it the
volume key, the column ``wrapped_volume_key``): every appliance activated so far, until its
agent migrates. ``split`` (agent/volumekey.py): the platform keeps only its share of the
current key epoch (``wrapped_share``), useless without the appliance's own share.

A move to a new epoch (the migration of a passphrase appliance, or a rotation the operator
asked for) is two calls: `next_share` creates the pending share (idempotent), the appliance
re-keys its keyslot, then `commit_share` makes the pending share current and destroys the
value it replaces. Deactivation destroys every value there is. Each destruction is then
proven: SQLite by checkpointing and searching the files, PostgreSQL by VACUUM FULL and
reading the table's new heap.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

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
from tools.platform.db.filesearch import files_holding, files_holding_isolated

_SHRED_PENDING: Final = "shred_pending:"  # settings key prefix: deactivation whose proof failed
_SHARE_SHRED_PENDING: Final = "share_shred_pending:"  # ... a commit whose proof failed
SCHEME_PASSPHRASE: Final = "passphrase"  # noqa: S105 - a scheme name (protocol.api.KEY_SCHEME_*)
SCHEME_SPLIT: Final = "split"
MAX_EPOCH: Final = 2**32 - 1  # agent/volumekey.py accepts epochs 1..2^32-1

# (appliance id, name, epoch) -> a fresh platform share wrapped under the KEK for that epoch
WrapNewShare = Callable[[int, str, int], bytes]


@dataclass(frozen=True)
class KeyState:
    """What `appliance list` shows of a volume key (never a wrapped value)."""

    scheme: str
    epoch: int | None  # the split key's current epoch; None while on the passphrase scheme
    pending_epoch: int | None


@dataclass(frozen=True)
class VolumeKeyRecord:
    """An active appliance's wrapped volume-key parts: the current one (the keyslot
    passphrase, epoch 0, or the share of *epoch*) and the pending share, if any."""

    scheme: str
    epoch: int
    wrapped: bytes = field(repr=False)
    pending_epoch: int | None
    wrapped_pending: bytes | None = field(repr=False)


def _nonces(*blobs: Any) -> list[str]:
    """The random nonce of each wrapped value, hex (what a retried proof searches for)."""
    return [bytes(b)[1:13].hex() for b in blobs if b is not None]


def _needles(blobs: list[bytes], nonces_hex: list[str]) -> list[bytes]:
    """Search terms for a shredding proof: each whole blob and each nonce alone (the nonce
    is not secret; it is kept as hex, so it never matches its own record)."""
    return [*blobs, *(bytes.fromhex(h) for h in nonces_hex)]


def _deactivate_rows(db: Conn, app: Appliance, now: float) -> None:
    revoke_current(db, app, now, "deactivated")
    db.execute(
        "UPDATE appliances SET state = ?, deactivated_at = ?, wrapped_volume_key = NULL, code_hash = NULL, "
        "wrapped_share = NULL, pending_epoch = NULL, wrapped_pending_share = NULL WHERE id = ?",
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


_KEY_SELECT: Final = (
    "SELECT key_scheme, share_epoch, wrapped_volume_key, wrapped_share, pending_epoch, wrapped_pending_share "
    "FROM appliances"
)


def _record(row: tuple[Any, ...]) -> VolumeKeyRecord | None:
    scheme, epoch, passphrase, share, pending_epoch, pending = row
    current = passphrase if scheme == SCHEME_PASSPHRASE else share
    if current is None:
        return None
    return VolumeKeyRecord(
        scheme,
        0 if scheme == SCHEME_PASSPHRASE else int(epoch),
        bytes(current),
        None if pending_epoch is None else int(pending_epoch),
        None if pending is None else bytes(pending),
    )


def _begin_next(db: Conn, app: Appliance, now: float, wrap_new: WrapNewShare, by: str) -> tuple[int, bytes, bool]:
    """The pending share of *app* (its row locked by the caller): (epoch, wrapped, created)."""
    row = db.execute(_KEY_SELECT + " WHERE id = ?", (app.id,)).fetchone()
    record = _record(row)
    if record is None:
        raise NotFound(f"appliance {app.name!r} has no volume key on record")
    if record.pending_epoch is not None and record.wrapped_pending is not None:
        return record.pending_epoch, record.wrapped_pending, False
    epoch = record.epoch + 1
    if epoch > MAX_EPOCH:
        raise Conflict(f"appliance {app.name!r} has used every volume key epoch; re-image and re-activate it")
    wrapped = wrap_new(app.id, app.name, epoch)
    db.execute(
        "UPDATE appliances SET pending_epoch = ?, wrapped_pending_share = ? WHERE id = ?", (epoch, wrapped, app.id)
    )
    add_event(db, now, app.id, "volume_key_pending", f"epoch={epoch} by={by}")
    return epoch, wrapped, True


def _active_for_update(db: Conn, where: str, value: object, label: str) -> Appliance:
    row = db.execute(APPLIANCE_SELECT + f" WHERE {where} = ? FOR UPDATE", (value,)).fetchone()
    if row is None:
        raise NotFound(f"no appliance named {label!r}; see 'scanner-platform appliance list'")
    app = appliance_from_row(row)
    if app.state != STATE_ACTIVE:
        raise Conflict(f"appliance {app.name!r} is {app.state}, not active")
    return app


class Keyslots(Appliances):
    """The wrapped volume-key parts, their rotation, and deactivation that shreds them."""

    def wrapped_keyslot_passphrase(self, appliance_id: int) -> bytes | None:
        """The wrapped keyslot passphrase of an active passphrase-scheme appliance, or None
        (never activated, shredded, or moved to split keys)."""
        with self._read() as db:
            row = db.execute(
                "SELECT wrapped_volume_key FROM appliances WHERE id = ? AND state = ?",
                (appliance_id, STATE_ACTIVE),
            ).fetchone()
        return None if row is None or row[0] is None else bytes(row[0])

    def volume_key_record(self, appliance_id: int) -> VolumeKeyRecord | None:
        """The wrapped volume-key parts of an active appliance, or None (none on record)."""
        with self._read() as db:
            row = db.execute(_KEY_SELECT + " WHERE id = ? AND state = ?", (appliance_id, STATE_ACTIVE)).fetchone()
        return None if row is None else _record(row)

    def key_states(self) -> dict[int, KeyState]:
        """The volume-key scheme and epochs of every appliance, by id."""
        with self._read() as db:
            rows = db.execute("SELECT id, key_scheme, share_epoch, pending_epoch FROM appliances").fetchall()
        return {
            int(r[0]): KeyState(str(r[1]), None if r[2] is None else int(r[2]), None if r[3] is None else int(r[3]))
            for r in rows
        }

    def next_share(self, appliance_id: int, now: float, wrap_new: WrapNewShare) -> tuple[int, bytes]:
        """The pending platform share of an active appliance, created on the first call
        (the migration of a passphrase appliance): (epoch, wrapped share)."""
        with self._tx() as db:
            app = _active_for_update(db, "id", appliance_id, str(appliance_id))
            epoch, wrapped, _ = _begin_next(db, app, now, wrap_new, "appliance")
        return epoch, wrapped

    def rotate_volume_key(self, name: str, now: float, wrap_new: WrapNewShare) -> tuple[int, bool]:
        """Create the pending share of the next epoch for *name* (the operator's rotation):
        (epoch, created); an already pending one is kept (created False)."""
        with self._tx() as db:
            app = _active_for_update(db, "name", name, name)
            epoch, _, created = _begin_next(db, app, now, wrap_new, "operator")
        return epoch, created

    def commit_share(self, appliance_id: int, epoch: int, now: float, *, proof_timeout: float = 2.0) -> bool:
        """The appliance's keyslot opens with *epoch* only: make the pending share current,
        destroy the value it replaces, and prove that; True once proven.

        Repeating the commit of the current epoch retries an unproven destruction (True when
        nothing is left to prove). Raises Conflict when *epoch* is neither pending nor current.
        """
        with self._tx() as db:
            app = _active_for_update(db, "id", appliance_id, str(appliance_id))
            record = _record(db.execute(_KEY_SELECT + " WHERE id = ?", (app.id,)).fetchone())
            pending_key = f"{_SHARE_SHRED_PENDING}{app.name}"
            unproven = str(read_setting(db, pending_key) or "")
            nonces = [h for h in unproven.split(",") if h]
            blobs: list[bytes] = []
            if record is not None and record.pending_epoch == epoch and record.wrapped_pending is not None:
                blobs = [record.wrapped]
                nonces += _nonces(record.wrapped)
                put_setting(db, pending_key, ",".join(nonces))
                db.execute(
                    "UPDATE appliances SET key_scheme = ?, share_epoch = ?, wrapped_share = ?, "
                    "wrapped_volume_key = NULL, pending_epoch = NULL, wrapped_pending_share = NULL WHERE id = ?",
                    (SCHEME_SPLIT, epoch, record.wrapped_pending, app.id),
                )
                add_event(db, now, app.id, "volume_key_committed", f"epoch={epoch} replaced={record.epoch}")
            elif record is None or record.scheme != SCHEME_SPLIT or record.epoch != epoch:
                pending = "none" if record is None or record.pending_epoch is None else str(record.pending_epoch)
                raise Conflict(f"key epoch {epoch} is not pending (pending: {pending})")
        if not nonces:
            return True
        try:
            # Runs in the server, which keeps the database open: search from a child process.
            self._prove_shredded(
                app.name, _needles(blobs, nonces), proof_timeout, what="replaced volume-key part", isolated=True
            )
        except ShredUnproven:
            return False
        self.delete_setting(pending_key)
        return True

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
                needles = _needles([], [h for h in str(pending).split(",") if h])
            else:
                row = db.execute(
                    "SELECT wrapped_volume_key, wrapped_share, wrapped_pending_share FROM appliances WHERE id = ?",
                    (app.id,),
                ).fetchone()
                blobs = [bytes(b) for b in row if b is not None]
                # A replaced part whose destruction a commit could not prove yet: its nonce too.
                share_key = f"{_SHARE_SHRED_PENDING}{name}"
                earlier = [h for h in str(read_setting(db, share_key) or "").split(",") if h]
                nonces = _nonces(*blobs) + earlier
                if nonces:
                    needles = _needles(blobs, nonces)
                    put_setting(db, pending_key, ",".join(nonces))
                db.execute("DELETE FROM settings WHERE key = ?", (share_key,))
                _deactivate_rows(db, app, now)
        if needles:
            self._prove_shredded(name, needles, proof_timeout)
        self.delete_setting(pending_key)
        return self.appliance(name)

    def _prove_shredded(
        self, name: str, needles: list[bytes], timeout: float, what: str = "", *, isolated: bool = False
    ) -> None:
        """Raise ShredUnproven unless no needle is left in the database files. *what* names
        a replaced volume-key part (a commit); empty for deactivation. *isolated*: this
        process keeps the database open, so the files are searched from a child process
        (`filesearch` says why)."""
        if self._pool is not None:
            self._prove_shredded_postgres(name, needles, timeout, what)
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
                searched = files_holding_isolated(self.path, needles) if isolated else files_holding(self.path, needles)
                found = ["(search failed)"] if searched is None else searched
                if complete and not found:
                    return
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.1)
        finally:
            self._db.execute("PRAGMA busy_timeout = 30000")
        where = ", ".join(found) if found else "the WAL (checkpoint incomplete)"
        if what:
            raise ShredUnproven(f"appliance {name!r}: its {what} may still be in {where}; its next boot retries")
        raise ShredUnproven(
            f"appliance {name!r} is deactivated and revoked, but its wrapped keyslot passphrase may still be "
            f"in {where}: another process holds a read transaction open; stop it (or wait) and run "
            f"'scanner-platform appliance deactivate {name}' again to finish the proof"
        )

    def _prove_shredded_postgres(self, name: str, needles: list[bytes], timeout: float, what: str) -> None:
        import psycopg

        # VACUUM FULL rewrites the table into new files and drops the old ones, but it must keep
        # a dead row version that a snapshot taken before the shred can still see: any session of
        # this database older than the shred (an open transaction, an autovacuum ANALYZE of
        # another table) keeps the old row in the new heap too. So retry until the deadline, as
        # the SQLite proof waits for its readers, then name the sessions holding it back. A full
        # suite run hit this once on a healthy cluster. WAL segments, archives, replicas and
        # backups are out of our reach (docs/platform.md). VACUUM FULL also waits for every lock
        # on the table: lock_timeout bounds each try, so a session holding the table open costs
        # a retry, not a hang.
        deadline = time.monotonic() + timeout
        try:
            while True:
                with self._pool.connection() as conn:
                    conn.execute("SELECT set_config('lock_timeout', '1s', false)")
                    try:
                        conn.execute("VACUUM FULL appliances")
                        vacuumed = True
                    except psycopg.errors.LockNotAvailable:
                        vacuumed = False
                    finally:
                        conn.execute("RESET lock_timeout")
                    if vacuumed:
                        row = conn.execute(
                            "SELECT pg_read_binary_file(pg_relation_filepath('appliances'))"
                        ).fetchone()
                        if not any(n in bytes(row[0]) for n in needles):
                            return
                    if time.monotonic() >= deadline:
                        holders = conn.execute(
                            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                            "AND pid <> pg_backend_pid() AND (backend_xmin IS NOT NULL OR xact_start IS NOT NULL) "
                            "ORDER BY xact_start"
                        ).fetchall()
                        break
                time.sleep(0.1)
        except psycopg.errors.InsufficientPrivilege:
            if what:
                raise ShredUnproven(
                    f"appliance {name!r}: destruction of its {what} is unproven (no file access)"
                ) from None
            raise ShredUnproven(
                f"appliance {name!r} is deactivated and revoked, but the platform's database role may not "
                "rewrite or read the appliances table's file, so destruction is unproven; grant it "
                "ownership of the table and the pg_read_server_files role, then run "
                f"'scanner-platform appliance deactivate {name}' again"
            ) from None
        sessions = ", ".join(str(r[0]) for r in holders) or "none left now"
        if what:
            raise ShredUnproven(
                f"appliance {name!r}: its {what} is still in the appliances table's heap "
                f"(sessions with older transactions: {sessions}); its next boot retries"
            )
        raise ShredUnproven(
            f"appliance {name!r} is deactivated, but its wrapped keyslot passphrase is still in the "
            f"appliances table's heap: database sessions with transactions older than the shred keep it "
            f"(pids: {sessions}); end them (or wait) and run "
            f"'scanner-platform appliance deactivate {name}' again"
        )
