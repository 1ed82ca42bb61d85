"""The outbound HTTP CONNECT proxy: fixed at activation, part of the bound state, used for
every platform connection and the syslog forwarder, never bypassed; TLS stays end to end
(an intercepting proxy is refused by the certificate pinning)."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from agent import state as statemod
from agent.errors import AgentError, TamperedError
from agent.exitcodes import EXIT_PLATFORM, EXIT_TAMPERED, EXIT_USAGE
from agent.keystore.file import FileKeystore
from agent.keystore.tpm import TpmKeystore
from protocol.client import new_client_key_and_csr
from protocol.proxy import ProxyConfig, connect_request, parse_connect_response
from protocol.sealing import generate_keypair
from tests.agent.conftest import ROOT, AgentRun, Rsyslog, make_pki, run_agent_cli
from tests.agent.proxies import (
    free_port,
    remote_endpoints,
    start_intercepting_proxy,
    start_tinyproxy,
)
from tests.agent.test_lifecycle import _descendants, _socket_inodes
from tools.demo import Platform, agent_cmd
from tools.loopback_targets import start_banner_service
from tools.swtpm import Swtpm

USER = "scanner-appliance"
PASSWORD = "pw-PROXY-CANARY-7d1e"


def activate_via(platform: Platform, name: str, state_dir: Path, proxy_url: str,
                 credentials: bytes | None, tcti: str | None = None) -> subprocess.CompletedProcess[str]:
    """``scanner-agent activate --proxy URL [--proxy-auth-fd N]`` (credentials on a pipe),
    into the TPM at *tcti*, or the file keystore without one."""
    code = platform.cli("appliance", "add", name).stdout.decode().strip()
    keystore = ["--tcti", tcti] if tcti else ["--keystore", "file"]
    args = ["activate", str(state_dir), "--platform", platform.url, "--ca", str(platform.ca),
            "--code", "-", "--proxy", proxy_url, *keystore]
    pass_fds: tuple[int, ...] = ()
    r_fd = w_fd = -1
    if credentials is not None:
        r_fd, w_fd = os.pipe()
        os.write(w_fd, credentials + b"\n")
        os.close(w_fd)
        args += ["--proxy-auth-fd", str(r_fd)]
        pass_fds = (r_fd,)
    try:
        return subprocess.run(agent_cmd(*args), input=code + "\n", capture_output=True, text=True,
                              timeout=120, pass_fds=pass_fds, check=False,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
    finally:
        if r_fd >= 0:
            os.close(r_fd)


def serve_peers(platform: Platform) -> list[tuple[str, str]]:
    """(peer address, path) of every request the platform served."""
    text = (platform.state / "serve.log").read_text(errors="replace")
    return re.findall(r"request peer=([0-9.]+):\d+ method=\S+ path=(\S+)", text)


class RemoteSampler:
    """Remote endpoints of the agent's (and its children's) TCP sockets, sampled every 20 ms."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.seen: set[tuple[str, int]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.02):
            pids = _descendants(self.pid)
            self.seen |= remote_endpoints(pids, _socket_inodes(pids))

    def __enter__(self) -> RemoteSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


# --- pure parts ---------------------------------------------------------------------------


def test_proxy_url_and_request_never_leak_credentials() -> None:
    p = ProxyConfig.parse("http://proxy.lan:3128", b"u:" + PASSWORD.encode())
    assert p.url == "http://proxy.lan:3128" and PASSWORD not in repr(p)
    with pytest.raises(ValueError) as e:
        ProxyConfig.parse(f"http://u:{PASSWORD}@proxy.lan:3128")
    assert PASSWORD not in str(e.value)
    for bad in ("https://proxy.lan:3128", "http://proxy.lan", "http://proxy.lan:3128/x", "proxy.lan:3128"):
        with pytest.raises(ValueError):
            ProxyConfig.parse(bad)
    for creds in (b"nouser", b":pw", b"u:p\r\nX-Evil: 1"):
        with pytest.raises(ValueError):
            ProxyConfig.parse("http://proxy.lan:3128", creds)
    head = bytes(connect_request("::1", 8443, b"u:p"))
    assert head.startswith(b"CONNECT [::1]:8443 HTTP/1.1\r\nHost: [::1]:8443\r\n")
    assert b"Proxy-Authorization: Basic dTpw\r\n" in head and head.endswith(b"\r\n\r\n")
    assert parse_connect_response(b"HTTP/1.0 407 Proxy Authentication Required") == (
        407, "Proxy Authentication Required")


def test_proxy_is_bound_into_the_state(tmp_path: Path) -> None:
    key_pem, csr_pem = new_client_key_and_csr("t")
    seal_priv, _ = generate_keypair()
    pki = make_pki(tmp_path / "pki")
    root = tmp_path / "state"
    proxy = ProxyConfig.parse("http://127.0.0.1:3128", f"{USER}:{PASSWORD}".encode())
    statemod.write_state(root, statemod.PlatformEndpoint.parse("https://platform.example:8443"), "app1",
                         pki.ca_pem, pki.issue_client(csr_pem), key_pem, seal_priv, 1.0,
                         FileKeystore(root), proxy=proxy)
    st = statemod.load_state(root)
    assert st.proxy == proxy and st.proxy is not None and st.proxy.credentials == proxy.credentials
    assert PASSWORD.encode() not in (root / statemod.STATE_JSON).read_bytes()
    assert oct((root / statemod.PROXY_CREDENTIALS).stat().st_mode & 0o777) == "0o600"
    good = {n: (root / n).read_bytes() for n in (statemod.STATE_JSON, statemod.PROXY_CREDENTIALS)}

    def edit(name: str, data: bytes | None) -> None:
        for n, d in good.items():
            (root / n).write_bytes(d)
            (root / n).chmod(0o600)
        if data is None:
            (root / name).unlink()
        else:
            (root / name).write_bytes(data)

    doc = json.loads(good[statemod.STATE_JSON])
    redirected = json.dumps({**doc, "proxy": {"url": "http://127.0.0.1:9999", "credentials": True}}).encode()
    direct = json.dumps({k: v for k, v in doc.items() if k != "proxy"}).encode()
    for name, data in ((statemod.PROXY_CREDENTIALS, b"other:password"), (statemod.PROXY_CREDENTIALS, None),
                       (statemod.STATE_JSON, redirected), (statemod.STATE_JSON, direct)):
        edit(name, data)
        with pytest.raises(TamperedError):
            statemod.load_state(root)
    edit(statemod.STATE_JSON, good[statemod.STATE_JSON])
    assert statemod.load_state(root).proxy == proxy
    edit(statemod.PROXY_CREDENTIALS, b"other:password")
    r2 = run_agent_cli("run", str(root), "--once")
    assert r2.returncode == EXIT_TAMPERED and len(r2.stderr.strip().splitlines()) == 1


def test_proxy_credentials_in_the_tpm_keystore(tmp_path: Path, swtpm: Swtpm) -> None:
    """With the tpm keystore the password is an envelope like the private keys: no state
    file holds it in clear, and the binding still covers it."""
    key_pem, csr_pem = new_client_key_and_csr("t")
    seal_priv, _ = generate_keypair()
    pki = make_pki(tmp_path / "pki")
    root = tmp_path / "state"
    proxy = ProxyConfig.parse("http://127.0.0.1:3128", f"{USER}:{PASSWORD}".encode())
    keystore = TpmKeystore.create(root, swtpm.tcti, ())
    try:
        statemod.write_state(root, statemod.PlatformEndpoint.parse("https://platform.example:8443"), "app1",
                             pki.ca_pem, pki.issue_client(csr_pem), key_pem, seal_priv, 1.0, keystore,
                             proxy=proxy)
    finally:
        keystore.close()
    assert not (root / statemod.PROXY_CREDENTIALS).exists()
    assert (root / (statemod.PROXY_CREDENTIALS + ".tpm")).exists()
    assert_password_absent(root)
    st = statemod.load_state(root)
    try:
        assert st.keystore.kind == "tpm" and st.proxy == proxy
        creds = st.proxy.credentials if st.proxy else None
        assert isinstance(creds, bytearray)
    finally:
        st.forget()
    assert creds == bytearray(len(creds))  # wiped by forget()
    # A clear credentials file planted next to the envelope is refused, not preferred.
    (root / statemod.PROXY_CREDENTIALS).write_bytes(b"other:password")
    (root / statemod.PROXY_CREDENTIALS).chmod(0o600)
    statemod.load_state(root).forget()  # the tpm keystore never reads the clear name
    (root / statemod.PROXY_CREDENTIALS).unlink()
    # Swapping the envelope for another secret's envelope fails (AAD names the secret).
    envelope = root / (statemod.PROXY_CREDENTIALS + ".tpm")
    saved = envelope.read_bytes()
    envelope.write_bytes((root / (statemod.SEAL_KEY + ".tpm")).read_bytes())
    with pytest.raises(AgentError):
        statemod.load_state(root)
    envelope.write_bytes(saved)
    statemod.load_state(root).forget()


def assert_password_absent(root: Path) -> None:
    """The proxy password in no file under *root*, in clear or base64 (the Basic token)."""
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode())
    for path in (p for p in root.rglob("*") if p.is_file() and p.name != "volume.img"):
        data = path.read_bytes()
        assert PASSWORD.encode() not in data and token not in data, path


def test_activate_proxy_usage_errors(tmp_path: Path) -> None:
    ca = make_pki(tmp_path / "pki").ca_path
    base = ["activate", str(tmp_path / "st"), "--platform", "https://127.0.0.1:1", "--ca", str(ca)]
    for extra, needle in (
        (["--code", "x", "--proxy", f"http://u:{PASSWORD}@127.0.0.1:3128"], "must not contain credentials"),
        (["--code", "x", "--proxy", "socks5://127.0.0.1:1080"], "http://"),
        (["--code", "x", "--proxy-auth-fd", "0"], "needs --proxy"),
        (["--code", "-", "--proxy", "http://127.0.0.1:3128", "--proxy-auth-fd", "0"], "both read stdin"),
    ):
        r = run_agent_cli(*base, *extra)
        assert r.returncode == EXIT_USAGE, (extra, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr
        assert PASSWORD not in r.stderr
    assert not (tmp_path / "st").exists()


# --- end to end through a real tinyproxy -------------------------------------------------------


def test_everything_goes_through_tinyproxy(
    platform: Platform, rsyslog: Rsyslog, agent_factory: Callable[..., AgentRun], tmp_path: Path,
    swtpm: Swtpm,
) -> None:
    """A file-keystore appliance behind the proxy: activation, a job, seal-key upgrade, then
    migrate-keystore into the TPM and a second job, every connection through the proxy."""
    proxy = start_tinyproxy(tmp_path / "tinyproxy", (USER, PASSWORD))
    svc = start_banner_service("ssh", b"SSH-2.0-ProxyTest\r\n")
    try:
        platform.cli("syslog", "set", "--host", "127.0.0.1", "--port", str(rsyslog.port),
                     "--ca", str(rsyslog.pki.ca_path))
        platform.cli("heartbeat", "set", "--interval", "0.5")
        state = tmp_path / "appliance"
        r = activate_via(platform, "app1", state, proxy.url, f"{USER}:{PASSWORD}".encode())
        assert r.returncode == 0, r.stderr
        assert PASSWORD not in r.stdout + r.stderr
        assert (state / statemod.PROXY_CREDENTIALS).exists()  # the file keystore's clear layout
        job = platform.cli("job", "add", "app1", "--targets", "127.0.0.1",
                           "--ports", str(svc.port)).stdout.decode().strip()
        run = agent_factory(state, "--once")
        with RemoteSampler(run.proc.pid) as sampler:
            run.proc.wait(timeout=240)
        log = run.stderr()
        assert run.proc.returncode == 0, log[-2000:]
        lines = rsyslog.wait_for(lambda got: any("event=upload_acknowledged" in ln for ln in got))
        upgrade = run_agent_cli("seal-key", "upgrade", str(state))
        assert upgrade.returncode == 0, upgrade.stderr
        # Into the TPM, through the proxy (session, certificate renewal); the credentials
        # become an envelope and their clear file is shredded with the keys.
        migrated = run_agent_cli("migrate-keystore", str(state), "--tcti", swtpm.tcti)
        assert migrated.returncode == 0, migrated.stderr
        assert not (state / statemod.PROXY_CREDENTIALS).exists()
        assert_password_absent(state)
        job2 = platform.cli("job", "add", "app1", "--targets", "127.0.0.1",
                            "--ports", str(svc.port)).stdout.decode().strip()
        run2 = agent_factory(state, "--once")
        with RemoteSampler(run2.proc.pid) as sampler2:
            run2.proc.wait(timeout=240)
        log += run2.stderr()
        assert run2.proc.returncode == 0, log[-2000:]
        assert "keystore=tpm" in run2.stderr()
    finally:
        svc.close()
        proxy.stop()
    assert [j["state"] for j in json.loads(platform.cli("job", "list", "--json").stdout)
            if j["id"] in (job, job2)] == ["done", "done"]
    # tinyproxy's own log: tunnels to the platform (activation, time, boot, jobs, upload,
    # heartbeat) and to the syslog target.
    connects = proxy.connects()
    assert connects.count(f"127.0.0.1:{platform.port}") >= 8, connects
    assert f"127.0.0.1:{rsyslog.port}" in connects
    assert set(connects) == {f"127.0.0.1:{platform.port}", f"127.0.0.1:{rsyslog.port}"}
    assert "/v1/" not in proxy.log.read_text()  # it saw tunnels, never a request inside them
    # The platform saw every request come from the proxy's upstream address, none from
    # the agent directly: activation included.
    peers = serve_peers(platform)
    app_paths = {path for _peer, path in peers}
    for path in ("/v1/time", "/v1/activate", "/v1/config", "/v1/session", "/v1/volume-key",
                 "/v1/jobs/next", f"/v1/jobs/{job}/result", f"/v1/jobs/{job2}/result", "/v1/heartbeat",
                 "/v1/appliance/seal-key", "/v1/appliance/certificate"):
        assert path in app_paths, (path, app_paths)
    assert {peer for peer, _path in peers} == {proxy.outgoing}, peers
    # And the agent itself only ever connected to the proxy and the scan target.
    assert (("127.0.0.1", proxy.port)) in sampler.seen
    assert sampler.seen | sampler2.seen <= {("127.0.0.1", proxy.port), ("127.0.0.1", svc.port)}, (
        sampler.seen, sampler2.seen)
    assert any(" app1 scanner-agent " in ln and "event=job_received" in ln for ln in lines)
    # The proxy password is nowhere: not in logs, not in the state dir (TPM envelope now).
    assert PASSWORD not in log and PASSWORD not in (platform.state / "serve.log").read_text()
    assert PASSWORD not in proxy.log.read_text()
    for proc in (r, upgrade, migrated):
        assert PASSWORD not in proc.stdout + proc.stderr
    assert_password_absent(state)


def test_wrong_proxy_credentials_refused_in_one_line(platform: Platform, tmp_path: Path) -> None:
    proxy = start_tinyproxy(tmp_path / "tinyproxy", (USER, PASSWORD))
    try:
        r = activate_via(platform, "app1", tmp_path / "st", proxy.url, f"{USER}:wrong-{PASSWORD}".encode())
    finally:
        proxy.stop()
    assert r.returncode == EXIT_PLATFORM
    [line] = r.stderr.strip().splitlines()
    # tinyproxy answers 401 to wrong credentials (407 to none): either way, named and refused.
    assert re.search(r"refused the tunnel to .*: 40[17] ", line) and proxy.url in line, line
    assert PASSWORD not in line
    assert serve_peers(platform) == []  # no direct attempt either
    assert not (tmp_path / "st").exists() or not any((tmp_path / "st").iterdir())


def test_tls_intercepting_proxy_is_refused_by_pinning(platform: Platform, tmp_path: Path) -> None:
    mitm = start_intercepting_proxy(tmp_path / "mitm")
    try:
        r = activate_via(platform, "app1", tmp_path / "st", mitm.url, None)
    finally:
        mitm.close()
    assert r.returncode == EXIT_PLATFORM, r.stderr
    [line] = r.stderr.strip().splitlines()
    assert "certificate verification failed" in line, line
    assert mitm.connects and all(c == f"CONNECT 127.0.0.1:{platform.port} HTTP/1.1" for c in mitm.connects)
    assert mitm.handshake_errors  # the agent aborted the handshake with the impostor
    assert serve_peers(platform) == []  # and never went around the proxy
    assert not (tmp_path / "st").exists() or not any((tmp_path / "st").iterdir())


def test_unreachable_proxy_means_no_connection_at_all(platform: Platform, tmp_path: Path) -> None:
    r = activate_via(platform, "app1", tmp_path / "st", f"http://127.0.0.1:{free_port()}", None)
    assert r.returncode == EXIT_PLATFORM
    [line] = r.stderr.strip().splitlines()
    assert "cannot connect to proxy" in line and "check the proxy fixed at activation" in line
    assert serve_peers(platform) == []

