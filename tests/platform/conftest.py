"""Fixtures: a real platform (real TLS on 127.0.0.1, real SQLite) run in-process or as a
subprocess, plus appliances activated through the real client."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from agent.timesync import Clock
from agent.tls import client_context
from protocol import client, sealing
from tools.children import stop_child
from tools.platform import ca, db, state
from tools.platform.handlers import AppConfig
from tools.platform.pgtemp import TempPostgres, temp_postgres
from tools.platform.server import Server, ServerLimits, build_app, server_context


def tls_client(ca_pem: bytes, cert_pem: bytes | None = None, key_pem: bytes | None = None) -> ssl.SSLContext:
    """The agent's TLS client policy (agent.tls, the only one); it takes the certificate and
    key from memory (a memfd inside), so the test's private key stays off disk."""
    return client_context(ca_pem, Clock(), cert_pem, key_pem)


PLATFORM = [sys.executable, "-m", "tools.platform"]
HOSTNAME = "localhost"


def run_cli(
    *args: str, state_dir: Path | None = None, stdin: bytes | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
    """Run the real `scanner-platform` CLI in a subprocess."""
    cmd = [*PLATFORM, *args]
    env = dict(os.environ)
    if state_dir is not None:
        env["SCANNER_PLATFORM_STATE"] = str(state_dir)
    return subprocess.run(cmd, input=stdin, capture_output=True, timeout=timeout, env=env, check=False)


@dataclass
class Appliance:
    """An activated appliance as the agent would hold it."""

    name: str
    key_pem: bytes = field(repr=False)
    cert_pem: bytes
    x25519_private: bytes = field(repr=False)
    x25519_public: bytes
    client: client.PlatformClient
    hybrid_private: bytearray | None = field(default=None, repr=False)
    hybrid_public: bytes | None = None


@dataclass
class Platform:
    """A running platform in this process."""

    paths: state.StatePaths
    port: int
    storage: db.Storage  # a separate connection for test assertions
    server: Server

    @property
    def url(self) -> str:
        return f"https://{HOSTNAME}:{self.port}"

    @property
    def ca_pem(self) -> bytes:
        return self.paths.ca_cert.read_bytes()

    def add_appliance(self, name: str, ttl: float = 3600.0) -> str:
        code = ca.new_activation_code()
        now = time.time()
        self.storage.add_appliance(name, ca.code_hash(code), now + ttl, now)
        return code

    def anon_client(self, timeout: float = 20.0) -> client.PlatformClient:
        return client.PlatformClient(self.url, tls_client(self.ca_pem), timeout)

    async def activate(self, name: str, hybrid: bool = False) -> Appliance:
        """Activate like an agent; hybrid=False is an agent from before sealing v2."""
        code = self.add_appliance(name)
        key_pem, csr = client.new_client_key_and_csr(name)
        xpriv, xpub = sealing.generate_keypair()
        hpriv, hpub = sealing.generate_hybrid_keypair() if hybrid else (None, None)
        res = await self.anon_client().activate(code, csr, xpub, hpub)
        ctx = tls_client(self.ca_pem, res.certificate_pem, key_pem)
        c = client.PlatformClient(self.url, ctx, timeout=20.0)
        await c.open_session(1, "file")  # its first boot: keys and jobs need a session
        return Appliance(name, key_pem, res.certificate_pem, xpriv, xpub, c, hpriv, hpub)


def init_state(root: Path, hostname: str = HOSTNAME, database_url: str | None = None) -> state.StatePaths:
    """An initialised state dir (same steps as `scanner-platform init`)."""
    paths = state.init_state(root, hostname, database_url)
    state.open_storage(paths, pool_size=1).close()
    return paths


BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[TempPostgres]:
    """One PostgreSQL cluster for the session (a fresh database per test), stopped by PID."""
    with temp_postgres() as pg:
        yield pg


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest) -> str | None:
    """None for SQLite (the state dir's file), else a fresh PostgreSQL database's URL."""
    if request.param == "sqlite":
        return None
    pg: TempPostgres = request.getfixturevalue("pg_cluster")
    return pg.create_database()


@pytest.fixture
def state_paths(tmp_path: Path, database_url: str | None) -> state.StatePaths:
    return init_state(tmp_path / "platform", database_url=database_url)


@pytest.fixture
def app_config() -> AppConfig:
    return AppConfig(lease_seconds=30.0, max_result_bytes=256 * 1024, poll_interval=0.05)


@asynccontextmanager
async def serving(
    state_paths: state.StatePaths,
    app_config: AppConfig,
    limits: ServerLimits,
    pool_size: int = 16,
    checker_pool_size: int = 16,
) -> AsyncIterator[Platform]:
    """The platform served in-process on 127.0.0.1 (ephemeral port), real TLS, stopped on exit."""
    app, storage = build_app(state_paths, app_config, pool_size=pool_size)
    server = Server(app, server_context(state_paths), limits)
    checker = state.open_storage(state_paths, pool_size=checker_pool_size)
    try:
        # The server runs in a nursery of its own, closed before the storage it uses.
        async with trio.open_nursery() as own:
            _host, port = await own.start(server.serve, "127.0.0.1", 0)
            try:
                yield Platform(state_paths, port, checker, server)
            finally:
                own.cancel_scope.cancel()
    finally:
        checker.close()
        storage.close()


@pytest.fixture
async def platform(state_paths: state.StatePaths, app_config: AppConfig) -> AsyncIterator[Platform]:
    """The platform served in-process on 127.0.0.1 (ephemeral port), real TLS."""
    limits = ServerLimits(handshake_timeout=5, header_timeout=5, idle_timeout=5)
    async with serving(state_paths, app_config, limits, pool_size=4, checker_pool_size=2) as served:
        yield served


@dataclass
class ServedProcess:
    """`scanner-platform serve` running as a subprocess."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path


@pytest.fixture
def served(tmp_path: Path, database_url: str | None) -> Iterator[ServedProcess]:
    """A real `scanner-platform serve` subprocess on port 0, stopped by PID at teardown."""
    root = tmp_path / "served"
    extra = ["--database", database_url] if database_url else []
    assert run_cli("init", str(root), "--hostname", HOSTNAME, *extra).returncode == 0
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(
            [
                *PLATFORM,
                "serve",
                str(root),
                "--listen",
                "127.0.0.1:0",
                "--lease-seconds",
                "2",
                "--poll-interval",
                "0.05",
            ],
            stdout=subprocess.PIPE,
            stderr=logf,
        )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert line.startswith("listening on 127.0.0.1:"), (line, log_path.read_text())
        port = int(line.rsplit(":", 1)[1])
        assert (root / "serve.addr").read_text().strip() == f"127.0.0.1:{port}"
        yield ServedProcess(proc, port, log_path)
    finally:
        stop_child(proc, patience=15)
        if proc.stdout is not None:
            proc.stdout.close()
