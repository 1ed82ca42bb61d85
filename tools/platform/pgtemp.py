"""A throwaway PostgreSQL cluster (Debian's server binaries) for tests and the load tool.

initdb + pg_ctl in a temporary directory, listening only on a unix socket in that directory
(no TCP port at all), trust authentication, fsync off (the data dies with the directory).
When we run as root, the cluster runs as the ``postgres`` user, as PostgreSQL refuses root.
Stopped by the postmaster's PID (never by name) and the directory removed.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["PostgresError", "TempPostgres", "find_bindir", "temp_postgres"]


class PostgresError(Exception):
    """The temporary cluster could not be created or started; the message says why."""


def find_bindir() -> Path:
    """The newest /usr/lib/postgresql/N/bin that has initdb (Debian's layout)."""
    root = Path("/usr/lib/postgresql")
    versions = sorted(
        (p for p in root.glob("*/bin") if (p / "initdb").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if not versions:
        raise PostgresError("PostgreSQL server binaries not found; apt-get install postgresql (make setup does)")
    return versions[-1]


class TempPostgres:
    """One running cluster; ``url(dbname)`` connects to it as its superuser."""

    def __init__(self, root: Path, bindir: Path, user: str) -> None:
        self.root = root
        self.bindir = bindir
        self.user = user
        self.data = root / "data"
        self.socket_dir = root
        self.pid: int | None = None
        self._seq = 0

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.user}@/{dbname}?host={self.socket_dir}&port=5432"

    def _run(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        argv = list(cmd)
        if os.geteuid() == 0:
            argv = ["runuser", "-u", self.user, "--", *argv]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)

    def start(self) -> None:
        res = self._run(
            str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", self.user,
            "--no-sync", "-E", "UTF8", "--locale=C",
        )
        if res.returncode != 0:
            raise PostgresError(f"initdb failed: {res.stderr.strip()[-300:]}")
        opts = (
            f"-c listen_addresses='' -c unix_socket_directories={self.socket_dir} -c port=5432 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300 "
            "-c shared_buffers=64MB"
        )
        res = self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"),
            "-o", opts, "-w", "-t", "60", "start",
        )
        if res.returncode != 0:
            logfile = self.root / "server.log"
            log = logfile.read_text(errors="replace")[-500:] if logfile.exists() else ""
            raise PostgresError(f"pg_ctl start failed: {res.stderr.strip()[-300:]} {log}")
        self.pid = int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])

    def create_database(self, prefix: str = "t") -> str:
        """A fresh empty database; its URL."""
        import psycopg

        self._seq += 1
        name = f"{prefix}{os.getpid()}_{self._seq}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        """Fast shutdown of the postmaster by its PID; SIGKILL if it lingers."""
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)  # "fast" shutdown: disconnect clients, exit
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                os.kill(pid, 0)
                time.sleep(0.05)
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)


@contextlib.contextmanager
def temp_postgres(user: str = "postgres") -> Iterator[TempPostgres]:
    """A running cluster for the duration of the block."""
    bindir = find_bindir()
    root = Path(tempfile.mkdtemp(prefix="scratchfs-pg-"))
    try:
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam(user)
            except KeyError:
                raise PostgresError(f"no {user!r} user; apt-get install postgresql creates it") from None
            os.chown(root, pw.pw_uid, pw.pw_gid)
        else:
            user = pwd.getpwuid(os.geteuid()).pw_name
        pg = TempPostgres(root, bindir, user)
        pg.start()
        try:
            yield pg
        finally:
            pg.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
