"""Fixtures for the agent's tests: a real platform, real rsyslog, test PKI, agent runs.

Every process started here is stopped by PID at teardown; every mount an agent left below
a test's temp dir is cleared (and reported as a failure).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tools.children import stop_child
from tools.demo import (
    ROOT,
    Platform,
    activate,
    agent_cmd,
    clear_mounts,
    mounts_under,
    start_platform,
)
from tools.swtpm import Swtpm, start_swtpm

# --- PKI ---------------------------------------------------------------------------------


@dataclass
class Pki:
    """A CA and one server certificate, as PEM files in a directory."""

    ca_pem: bytes
    ca_path: Path
    cert_path: Path
    key_path: Path
    ca_key: ec.EllipticCurvePrivateKey

    def issue_client(self, csr_pem: bytes) -> bytes:
        """A client certificate (PEM) for the key in *csr_pem*, signed by this CA."""
        ca = x509.load_pem_x509_certificate(self.ca_pem)
        csr = x509.load_pem_x509_csr(csr_pem)
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder().subject_name(csr.subject).issuer_name(ca.subject)
            .public_key(csr.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(self.ca_key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM)


def make_pki(
    directory: Path,
    names: tuple[str, ...] = ("127.0.0.1", "localhost"),
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> Pki:
    """A fresh P-256 CA and a server certificate for *names* (IPs become IP SANs)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    nb = not_before or now - datetime.timedelta(hours=1)
    na = not_after or now + datetime.timedelta(days=1)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"test CA {os.urandom(4).hex()}")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(nb).not_valid_after(na)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(nb).not_valid_after(na)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    (directory / "ca.pem").write_bytes(ca_pem)
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return Pki(
        ca_pem, directory / "ca.pem", directory / "cert.pem", directory / "key.pem", ca_key
    )


# --- rsyslog -------------------------------------------------------------------------------


@dataclass
class Rsyslog:
    """A real rsyslogd receiving RFC 5425 (TLS) on 127.0.0.1."""

    proc: subprocess.Popen[bytes]
    port: int
    pki: Pki
    out: Path

    def lines(self) -> list[str]:
        """Messages written so far (one per line, RFC 5424 format)."""
        try:
            return self.out.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def wait_for(self, predicate: Callable[[list[str]], bool], timeout: float = 20) -> list[str]:
        """Poll the output file until *predicate* holds (bounded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.lines()
            if predicate(got):
                return got
            time.sleep(0.1)
        return self.lines()


def start_rsyslog(directory: Path, port: int = 0, pki: Pki | None = None, address: str = "127.0.0.1") -> Rsyslog:
    """rsyslogd -n with imtcp + gtls (anon client auth), own config, work dir and pid file.

    It listens on *address* only (loopback unless a test bed needs another, e.g. the
    appliance test's bridge in its own network namespace).
    """
    pki = pki or make_pki(directory / "pki")
    work = directory / "work"
    work.mkdir(parents=True, exist_ok=True)
    port_file = directory / "port"
    port_file.unlink(missing_ok=True)
    out = directory / "out.log"
    conf = directory / "rsyslog.conf"
    conf.write_text(
        f'global(workDirectory="{work}" DefaultNetstreamDriver="gtls"\n'
        f'       DefaultNetstreamDriverCAFile="{pki.ca_path}"\n'
        f'       DefaultNetstreamDriverCertFile="{pki.cert_path}"\n'
        f'       DefaultNetstreamDriverKeyFile="{pki.key_path}")\n'
        'module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1"\n'
        '       StreamDriver.AuthMode="anon")\n'
        f'input(type="imtcp" address="{address}" port="{port}" listenPortFileName="{port_file}")\n'
        f'action(type="omfile" file="{out}" template="RSYSLOG_SyslogProtocol23Format")\n'
    )
    proc = subprocess.Popen(
        ["rsyslogd", "-n", "-f", str(conf), "-i", str(directory / "rsyslogd.pid")],
        stdout=subprocess.DEVNULL, stderr=open(directory / "rsyslogd.err", "wb"),
    )
    deadline = time.monotonic() + 20

    def ready() -> bool:
        if port == 0:
            return port_file.exists() and bool(port_file.read_text().strip())
        # rsyslog writes listenPortFileName only for port 0: probe the fixed port instead.
        with socket.socket() as s:
            return s.connect_ex((address, port)) == 0

    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError("rsyslogd did not start: " + (directory / "rsyslogd.err").read_text())
        time.sleep(0.05)
    bound = port or int(port_file.read_text().strip())
    return Rsyslog(proc, bound, pki, out)


stop_proc = stop_child  # SIGTERM by PID, SIGKILL after 10 s, reaped


@pytest.fixture
def rsyslog(tmp_path: Path) -> Iterator[Rsyslog]:
    """A real rsyslogd with TLS on loopback, stopped at teardown."""
    r = start_rsyslog(tmp_path / "rsyslog")
    try:
        yield r
    finally:
        stop_proc(r.proc)


# --- platform & agent ------------------------------------------------------------------------


@pytest.fixture
def platform_factory(tmp_path: Path) -> Iterator[Callable[..., Platform]]:
    """Start reference platforms (init + serve); all stopped at teardown."""
    started: list[Platform] = []

    def factory(name: str = "platform", **kw: object) -> Platform:
        p = start_platform(tmp_path / name, **kw)  # type: ignore[arg-type]
        started.append(p)
        return p

    yield factory
    for p in started:
        p.stop()


@pytest.fixture
def platform(platform_factory: Callable[..., Platform]) -> Platform:
    """One platform on 127.0.0.1 with a short job lease (crash tests wait for it)."""
    return platform_factory(lease_seconds=6)


@dataclass
class AgentRun:
    """A ``scanner-agent run`` child process."""

    proc: subprocess.Popen[bytes]
    stderr_path: Path

    def stderr(self) -> str:
        """Everything the agent logged so far."""
        return self.stderr_path.read_text(errors="replace")

    def wait_log(self, needle: str, timeout: float = 120) -> bool:
        """Wait until *needle* appears in the log, or the agent exits (bounded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.stderr():
                return True
            if self.proc.poll() is not None:
                return needle in self.stderr()
            time.sleep(0.05)
        return False


@pytest.fixture
def agent_factory(tmp_path: Path) -> Iterator[Callable[..., AgentRun]]:
    """Start ``scanner-agent run`` processes; killed by PID and mounts cleared at teardown."""
    runs: list[AgentRun] = []
    states: set[Path] = set()

    def factory(state_dir: Path, *args: str, prefix: tuple[str, ...] = ()) -> AgentRun:
        n = len(runs)
        err = tmp_path / f"agent-{n}.log"
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        cmd = agent_cmd("run", str(state_dir), "--volume-size", "32M", "--poll-wait", "2",
                        "--connect-timeout", "1", "--banner-timeout", "0.3", *args)
        proc = subprocess.Popen(
            [*prefix, *cmd],
            stdout=subprocess.DEVNULL, stderr=open(err, "wb"), env=env,
        )
        run = AgentRun(proc, err)
        runs.append(run)
        states.add(state_dir)
        return run

    yield factory
    for run in runs:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait(timeout=10)
    leftovers = []
    for state in states:
        if mounts_under(state):
            leftovers += clear_mounts(state)
    assert not leftovers, f"agent runs left mounts behind: {leftovers}"


@pytest.fixture
def activated(platform: Platform, tmp_path: Path) -> Path:
    """A state dir activated as appliance 'app1' with the platform fixture."""
    state = tmp_path / "appliance"
    activate(platform, "app1", state)
    return state


def run_agent_cli(*args: str, timeout: float = 180,
                  input_: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """``scanner-agent ARGS`` to completion, text output."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True,
        timeout=timeout, env=env, input=input_.decode() if input_ else None, check=False,
    )


# --- software TPM --------------------------------------------------------------------------


@pytest.fixture
def swtpm_factory(tmp_path: Path) -> Iterator[Callable[[str], Swtpm]]:
    """Start swtpm instances (socket mode, state under tmp_path); stopped by PID at teardown."""
    started: list[Swtpm] = []

    def factory(name: str = "tpm") -> Swtpm:
        tpm = start_swtpm(tmp_path / name)
        started.append(tpm)
        return tpm

    yield factory
    for tpm in started:
        tpm.stop()


@pytest.fixture
def swtpm(swtpm_factory: Callable[[str], Swtpm]) -> Swtpm:
    """One software TPM, started and TPM2_Startup(CLEAR)ed."""
    return swtpm_factory("tpm")
