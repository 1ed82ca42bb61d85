"""The platform state directory: CA, server certificate, KEK, database. Files are 0600.

Layout (STATE_DIR):
    ca.pem        root CA certificate (give this to appliances at activation)
    ca.key        root CA private key                          0600
    server.pem    server certificate for the --hostname of init
    server.key    server private key                           0600
    kek.key       key-encryption key for keyslot passphrases (32 bytes) 0600
    platform.db   SQLite database (WAL: platform.db-wal, -shm)  0600  (embedded default)
    database.url  PostgreSQL URL instead of platform.db          0600  (init --database)
    serve.addr    "HOST:PORT" actually bound by the running server
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from tools.platform import ca, db, keys


class StateError(Exception):
    """The state directory is missing, incomplete or unsafe; the message says what to do."""


@dataclass(frozen=True)
class StatePaths:
    """Paths inside one state directory."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    @property
    def kek(self) -> Path:
        return self.root / "kek.key"

    @property
    def db(self) -> Path:
        return self.root / "platform.db"

    @property
    def database_url(self) -> Path:
        return self.root / "database.url"

    @property
    def addr(self) -> Path:
        return self.root / "serve.addr"


def write_private(path: Path, data: bytes) -> None:
    """Create *path* with mode 0600 (never overwrite) and write *data*."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_public(path: Path, data: bytes) -> None:
    """Replace *path* atomically with *data*, mode 0644."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def read_private(path: Path) -> bytes:
    """Read a secret file, refusing it when group or others may read it."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise StateError(f"{path} is missing; run 'scanner-platform init' first") from None
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise StateError(f"{path} is readable by group or others; chmod 600 it")
    return path.read_bytes()


def init_state(root: Path, hostname: str, database_url: str | None = None) -> StatePaths:
    """Create CA, server certificate and KEK in *root* (created 0700 if missing).

    With *database_url* (``postgresql://...``) the platform uses that database instead
    of ``platform.db``; the URL may carry a password, so it is stored 0600.
    """
    paths = StatePaths(root)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    if database_url is not None and not db.is_database_url(database_url):
        raise StateError("--database must be a postgresql:// URL")
    for p in (paths.ca_key, paths.kek, paths.db, paths.database_url):
        if p.exists():
            raise StateError(f"{root} already holds a platform ({p.name}); use another directory")
    ca_key_pem, ca_cert_pem = ca.create_ca(f"scratchfs platform CA ({hostname})")
    write_private(paths.ca_key, ca_key_pem)
    write_public(paths.ca_cert, ca_cert_pem)
    authority = ca.load_ca(ca_key_pem, ca_cert_pem)
    srv_key, srv_cert = ca.issue_server_cert(authority, hostname)
    write_private(paths.server_key, srv_key)
    write_public(paths.server_cert, srv_cert)
    write_private(paths.kek, keys.new_key())
    if database_url is not None:
        write_private(paths.database_url, database_url.encode() + b"\n")
    return paths


def database_target(paths: StatePaths) -> Path | str:
    """The SQLite file or the PostgreSQL URL this state directory uses."""
    if paths.database_url.exists():
        return read_private(paths.database_url).decode().strip()
    return paths.db


def open_storage(paths: StatePaths, *, pool_size: int = 16) -> db.Storage:
    """The storage of this state directory (creating and migrating the schema if needed)."""
    return db.Storage(database_target(paths), pool_size=pool_size)


def load_ca(paths: StatePaths) -> ca.CA:
    """The CA of this state directory."""
    if not paths.ca_cert.exists():
        raise StateError(f"{paths.ca_cert} is missing; run 'scanner-platform init' first")
    return ca.load_ca(read_private(paths.ca_key), paths.ca_cert.read_bytes())


def load_kek(paths: StatePaths) -> bytes:
    """The key-encryption key of this state directory."""
    kek = read_private(paths.kek)
    if len(kek) != keys.KEY_LEN:
        raise StateError(f"{paths.kek} is not a {keys.KEY_LEN}-byte key; restore it from backup")
    return kek


def check_initialised(paths: StatePaths) -> None:
    """Raise StateError unless *paths* is an initialised state directory."""
    if not paths.root.is_dir():
        raise StateError(f"{paths.root} is not a directory; run 'scanner-platform init' first")
    database = paths.database_url if paths.database_url.exists() else paths.db
    for p in (paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key, paths.kek, database):
        if not p.exists():
            raise StateError(f"{p} is missing; run 'scanner-platform init {paths.root}' first")
