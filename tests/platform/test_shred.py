"""Deactivation proves that the wrapped volume key is gone from the database files, on
SQLite even with a reader holding the WAL open, and on PostgreSQL from the table's heap."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from tests.platform.conftest import init_state, run_cli
from tools.platform import ca, db, keys, state
from tools.platform.pgtemp import TempPostgres


def activated(storage: db.Storage, kek: bytes, name: str) -> bytes:
    """Activate *name* directly through Storage; return its wrapped volume key."""
    code = ca.code_hash(ca.new_activation_code())
    now = time.time()
    storage.add_appliance(name, code, now + 60, now)
    grant = storage.activate(
        code,
        now,
        b"x" * 32,
        lambda n: (b"pem", f"{abs(hash(n)):x}", f"fp-{n}"),
        lambda aid, n: keys.wrap(kek, keys.new_key(), aid, n),
    )
    wrapped = storage.wrapped_keyslot_passphrase(grant.appliance.id)
    assert wrapped is not None
    return wrapped


def db_files_holding(root: Path, needle: bytes) -> list[str]:
    return [p.name for p in root.iterdir() if p.name.startswith("platform.db") and needle in p.read_bytes()]


def test_open_reader_makes_deactivation_fail_until_proof(tmp_path: Path) -> None:
    paths = init_state(tmp_path / "st")
    storage = state.open_storage(paths)
    wrapped = activated(storage, paths.kek.read_bytes(), "victim")
    storage.close()  # last connection: the key is checkpointed into platform.db
    assert db_files_holding(paths.root, wrapped)

    reader = sqlite3.connect(paths.db, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM appliances").fetchone()  # holds its snapshot
    try:
        proc = run_cli("appliance", "deactivate", "victim", state_dir=paths.root)
        err = proc.stderr.decode().strip()
        assert proc.returncode == 7, err
        assert len(err.splitlines()) == 1 and "deactivate victim' again" in err
        # The failure was real: the key is still on disk while the reader holds the WAL.
        assert db_files_holding(paths.root, wrapped)
    finally:
        reader.execute("ROLLBACK")
        reader.close()
    # Appliance is deactivated and revoked already; the rerun only completes the proof.
    proc = run_cli("appliance", "deactivate", "victim", state_dir=paths.root)
    assert proc.returncode == 0, proc.stderr
    assert b"verified absent" in proc.stdout
    assert db_files_holding(paths.root, wrapped) == []
    assert db_files_holding(paths.root, wrapped[1:13]) == []
    proc = run_cli("appliance", "deactivate", "victim", state_dir=paths.root)
    assert proc.returncode == 4  # nothing left to prove: "deactivated already"


def test_reader_leaving_during_the_retries_lets_the_proof_finish(tmp_path: Path) -> None:
    paths = init_state(tmp_path / "st")
    storage = state.open_storage(paths)
    wrapped = activated(storage, paths.kek.read_bytes(), "victim")
    reader = sqlite3.connect(paths.db, isolation_level=None, check_same_thread=False)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM appliances").fetchone()
    leave = threading.Timer(0.5, lambda: (reader.execute("ROLLBACK"), reader.close()))
    leave.start()
    try:
        app = storage.deactivate("victim", time.time(), proof_timeout=20.0)
    finally:
        leave.join()
        storage.close()
    assert app.state == db.STATE_DEACTIVATED
    assert db_files_holding(paths.root, wrapped) == []


def test_postgresql_heap_no_longer_holds_the_key(tmp_path: Path, pg_cluster: TempPostgres) -> None:
    database_url = pg_cluster.create_database()
    paths = init_state(tmp_path / "st", database_url=database_url)
    storage = state.open_storage(paths)
    try:
        wrapped = activated(storage, paths.kek.read_bytes(), "victim")
        storage.deactivate("victim", time.time())
        assert storage.wrapped_keyslot_passphrase(storage.appliance("victim").id) is None
        import psycopg

        with psycopg.connect(database_url) as conn:
            heap = conn.execute("SELECT pg_read_binary_file(pg_relation_filepath('appliances'))").fetchone()
        assert heap is not None and wrapped[1:13] not in bytes(heap[0])
    finally:
        storage.close()


# "SELECT 1": a snapshot older than the shred, no lock on the table (VACUUM FULL runs and must
# keep the dead row); the table read: a lock too (VACUUM FULL would wait for it without bound).
@pytest.mark.parametrize("hold", ["SELECT 1", "SELECT count(*) FROM appliances"], ids=["snapshot", "lock"])
def test_postgresql_older_snapshot_is_waited_for_then_named(
    tmp_path: Path, pg_cluster: TempPostgres, hold: str
) -> None:
    # VACUUM FULL keeps a dead row version that an older snapshot of the same database can
    # still see (a full suite run once found the key in the rewritten heap this way): the
    # proof retries until its deadline, names the sessions, and a rerun finishes it.
    import psycopg

    database_url = pg_cluster.create_database()
    paths = init_state(tmp_path / "st", database_url=database_url)
    storage = state.open_storage(paths)
    holder = psycopg.connect(database_url)
    try:
        wrapped = activated(storage, paths.kek.read_bytes(), "victim")
        holder.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        holder.execute(hold).fetchone()
        with pytest.raises(db.ShredUnproven) as failed:
            storage.deactivate("victim", time.time(), proof_timeout=0.5)
        message = str(failed.value)
        assert f"pids: {holder.info.backend_pid}" in message and "deactivate victim' again" in message
        assert "\n" not in message and wrapped.hex() not in message
        assert storage.appliance("victim").state == db.STATE_DEACTIVATED  # committed; only unproven
        # The holder ends during the rerun's retries: the proof finishes without another call.
        leave = threading.Timer(0.5, holder.rollback)
        leave.start()
        try:
            storage.deactivate("victim", time.time(), proof_timeout=20.0)
        finally:
            leave.join()
        with psycopg.connect(database_url) as conn:
            heap = conn.execute("SELECT pg_read_binary_file(pg_relation_filepath('appliances'))").fetchone()
        assert heap is not None and wrapped[1:13] not in bytes(heap[0])
    finally:
        holder.close()
        storage.close()


def test_postgresql_without_file_access_fails_non_zero(tmp_path: Path, pg_cluster: TempPostgres) -> None:
    # A platform role that owns its tables but may not read server files: the heap check is
    # impossible, so deactivation must not claim destruction (exit 7), yet it is committed.
    import psycopg

    admin_url = pg_cluster.create_database()
    dbname = admin_url.split("/")[-1].split("?")[0]
    role = f"limited_{dbname}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{role}" LOGIN')
        conn.execute(f'GRANT ALL ON SCHEMA public TO "{role}"')
    url = admin_url.replace(f"//{pg_cluster.user}@", f"//{role}@")
    paths = init_state(tmp_path / "st", database_url=url)
    storage = state.open_storage(paths)
    try:
        activated(storage, paths.kek.read_bytes(), "victim")
    finally:
        storage.close()
    proc = run_cli("appliance", "deactivate", "victim", state_dir=paths.root)
    err = proc.stderr.decode().strip()
    assert proc.returncode == 7, err
    assert len(err.splitlines()) == 1 and "pg_read_server_files" in err
    storage = state.open_storage(paths)
    try:
        assert storage.appliance("victim").state == db.STATE_DEACTIVATED
    finally:
        storage.close()
