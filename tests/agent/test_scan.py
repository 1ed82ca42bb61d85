"""The scan engines against loopback services the tests start (and pure helpers)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.scan import nmap, tcp
from agent.scan.credcheck import b64_into, basic_auth_request
from agent.scan.model import MAX_HOSTS, ScanOptions, result_document
from agent.scan.runner import RESULT_FILE
from agent.scan.services import clean_banner, guess_service
from agent.scan.targets import Address, TargetError, count_hosts, expand_literal, resolve
from protocol import credential, scope
from tools.demo import ROOT
from tools.loopback_targets import Service, closed_port, start_banner_service, start_http_auth_service

CRED = b"scan-user:s3cret-pw-CANARY"
PASSWORD = b"s3cret-pw-CANARY"
# Sealed-scope plaintext as the agent hands it over: loopback, any port, cleartext allowed
# (these test services speak plain HTTP; tests/agent/test_credentials.py covers the rest).
SCOPE = scope.Scope.build(["127.0.0.0/8"], "1-65535", ["http-basic"], cleartext=True)


def cred_plain(password: bytes = PASSWORD) -> bytearray:
    return credential.pack(credential.Metadata("password", "scan-user", SCOPE), bytearray(password))
OPTS = ScanOptions(concurrency=16, connect_timeout=1.0, banner_timeout=0.3)


@pytest.fixture
def services() -> Iterator[dict[str, Service]]:
    svcs = {
        "ssh": start_banner_service("ssh", b"SSH-2.0-TestSSH_1.0\r\n"),
        "ftp": start_banner_service("ftp", b"220 test FTP server ready\r\n"),
        "web": start_http_auth_service(CRED, b"test-realm", b"Welcome-Operator-Page"),
    }
    yield svcs
    for s in svcs.values():
        s.close()


def test_expand_literal() -> None:
    assert expand_literal("127.0.0.1") == ["127.0.0.1"]
    assert expand_literal("10.0.0.0/30") == ["10.0.0.1", "10.0.0.2"]
    assert expand_literal("10.0.0.5/32") == ["10.0.0.5"]
    assert expand_literal("10.0.0.4/31") == ["10.0.0.4", "10.0.0.5"]
    assert expand_literal("::1") == ["::1"]
    assert expand_literal("localhost") is None
    with pytest.raises(TargetError):
        expand_literal("10.0.0.0/33")
    with pytest.raises(TargetError):
        expand_literal("10.0.0.0/8")  # more than MAX_HOSTS addresses


def test_count_hosts_is_the_one_cap() -> None:
    assert count_hosts(["127.0.0.1", "10.0.0.0/24", "localhost"]) == 1 + 256 + 1
    assert count_hosts(["10.0.0.0/16"]) == MAX_HOSTS
    for too_many in (["0.0.0.0/0"], ["10.0.0.0/16", "10.1.0.1"], ["::/0"], ["10.0.0.0/17"] * 3):
        with pytest.raises(TargetError, match=f"more than {MAX_HOSTS} addresses"):
            count_hosts(too_many)
    for nmap_range in ("10.0.0-255.0-255", "0-255.0-255.0-255.0-255", "10.0.*.1", "10.1,2.0.1"):
        with pytest.raises(TargetError, match="octet range"):
            count_hosts([nmap_range])


@pytest.mark.parametrize("targets", [["0.0.0.0/0"], ["10.0.0-255.0-255"], ["10.0.0.0/16", "127.0.0.1"]])
async def test_nmap_engine_refuses_more_than_the_cap(targets: list[str], tmp_path: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(nmap.NmapError, match=r"more than|octet range"):
        await nmap.run_nmap(targets, "22", tmp_path, 120)
    assert time.monotonic() - t0 < 5
    assert not (tmp_path / "nmap.xml").exists(), "nmap ran although the job was over the cap"


async def test_resolve_hostnames_and_errors() -> None:
    addrs, errors = await resolve(["localhost", "127.0.0.2", "no-such-host.invalid"], 5.0)
    assert Address("127.0.0.2", "127.0.0.2") in addrs
    assert any(a.target == "localhost" and a.address in ("127.0.0.1", "::1") for a in addrs)
    assert "no-such-host.invalid" in errors


def test_service_guess() -> None:
    assert guess_service(2222, "SSH-2.0-OpenSSH_9.2") == ("ssh", "banner")
    assert guess_service(8080, "HTTP/1.0 200 OK") == ("http", "banner")
    assert guess_service(25, "220 mail ESMTP Postfix") == ("smtp", "banner")
    assert guess_service(2121, "220 ProFTPD FTP ready") == ("ftp", "banner")
    assert guess_service(5432, "") == ("postgresql", "port")
    assert guess_service(40000, "") == ("unknown", "none")


def test_clean_banner() -> None:
    raw = b"HTTP/1.0 401 Unauthorized\r\nDate: x\r\nServer: demo\r\n\r\nbody"
    assert clean_banner(raw) == "HTTP/1.0 401 Unauthorized | Server: demo"
    assert clean_banner(b"\x00\x01SSH-2.0-x\x7f\r\nmore") == " SSH-2.0-x "
    assert len(clean_banner(b"A" * 5000)) == 200


@given(st.binary(max_size=100))
def test_b64_into_matches_base64(data: bytes) -> None:
    out = bytearray()
    b64_into(bytearray(data), out)
    assert bytes(out) == base64.b64encode(data)


def test_basic_auth_request_carries_the_credential() -> None:
    req = basic_auth_request("127.0.0.1", "scan-user", bytearray(PASSWORD))
    assert b"Authorization: Basic " + base64.b64encode(CRED) in req


async def test_builtin_scan_finds_services_and_banners(services: dict[str, Service]) -> None:
    closed = closed_port()
    ports = sorted([s.port for s in services.values()] + [closed])
    asked = 0

    async def source() -> bytearray:
        nonlocal asked
        asked += 1
        return cred_plain()

    hosts = await tcp.scan([Address("127.0.0.1", "127.0.0.1")], ports, OPTS, source)
    by_port = {p.port: p for p in hosts[0].ports}
    assert by_port[closed].state == "closed"
    ssh = by_port[services["ssh"].port]
    assert (ssh.state, ssh.service, ssh.banner) == ("open", "ssh", "SSH-2.0-TestSSH_1.0")
    assert ssh.auth == scope.OUT_OF_SCOPE  # an SSH port asks too; this scope has no ssh
    assert by_port[services["ftp"].port].service == "ftp"
    web = by_port[services["web"].port]
    assert web.service == "http" and web.banner.startswith("HTTP/1.0 401")
    assert web.auth == "accepted" and "Welcome-Operator-Page" in (web.auth_banner or "")
    assert asked == 1 and services["web"].authorized == 1
    body = result_document("9", "builtin", 1.0, 2.0, hosts)
    assert b"CANARY" not in body and b"scan-user" not in body
    doc = json.loads(body)
    assert doc["summary"]["open"] == 3 and doc["hosts"][0]["closed"] == 1


async def test_wrong_credential_is_rejected_and_no_credential_means_no_request(
    services: dict[str, Service],
) -> None:
    async def wrong() -> bytearray:
        return cred_plain(b"wrong")

    port = services["web"].port
    hosts = await tcp.scan([Address("t", "127.0.0.1")], [port], OPTS, wrong)
    assert hosts[0].ports[0].auth == "rejected"
    asked = False

    async def never() -> bytearray:
        nonlocal asked
        asked = True
        return cred_plain()

    # No port asks for authentication: the credential is never opened.
    hosts = await tcp.scan([Address("t", "127.0.0.1")], [services["ftp"].port], OPTS, never)
    assert not asked and hosts[0].ports[0].auth is None


async def test_concurrency_is_bounded(services: dict[str, Service]) -> None:
    """Many closed ports and one limiter slot still finish; results cover every port."""
    ports = list(range(1, 41))
    opts = ScanOptions(concurrency=1, connect_timeout=0.5, banner_timeout=0.2)
    hosts = await tcp.scan([Address("127.0.0.1", "127.0.0.1")], ports, opts)
    assert sorted(p.port for p in hosts[0].ports) == ports


NMAP_XML = b"""<?xml version="1.0"?>
<nmaprun scanner="nmap"><host><status state="up"/>
<address addr="127.0.0.1" addrtype="ipv4"/>
<hostnames><hostname name="localhost" type="user"/></hostnames>
<ports><extraports state="closed" count="7"/>
<port protocol="tcp" portid="22"><state state="open"/>
<service name="ssh" product="OpenSSH" version="9.2"/></port>
<port protocol="tcp" portid="81"><state state="filtered"/></port>
</ports></host></nmaprun>"""


def test_parse_nmap_xml() -> None:
    hosts = nmap.parse_nmap_xml(NMAP_XML, ["localhost"])
    assert len(hosts) == 1 and hosts[0].target == "localhost"
    doc = hosts[0].to_json()
    assert doc["ports"] == [
        {"port": 22, "state": "open", "service": "ssh", "banner": "OpenSSH 9.2", "guess": "nmap"}
    ]
    assert doc["closed"] == 7 and doc["filtered"] == 1
    with pytest.raises(nmap.NmapError):
        nmap.parse_nmap_xml(b"<not-xml", [])


def test_nmap_command_is_connect_scan_without_dns() -> None:
    cmd = nmap.nmap_command("/usr/bin/nmap", ["127.0.0.1"], "22,80", Path("/s/x.xml"))
    assert {"-sT", "-n", "-Pn"} <= set(cmd) and cmd[-2:] == ["--", "127.0.0.1"]
    assert cmd[cmd.index("-oX") + 1] == "/s/x.xml"


@pytest.mark.skipif(nmap.nmap_path() is None, reason="nmap is not installed")
async def test_nmap_engine_against_loopback(services: dict[str, Service], tmp_path: Path) -> None:
    ports = f"{services['ssh'].port},{closed_port()}"
    hosts = await nmap.run_nmap(["127.0.0.1"], ports, tmp_path, 120)
    assert (tmp_path / "nmap.xml").exists()
    opened = [p for h in hosts for p in h.ports if p.state == "open"]
    assert [p.port for p in opened] == [services["ssh"].port]
    assert opened[0].service == "ssh"


def _write_job(job_dir: Path, ports: str, engine: str = "builtin") -> None:
    job_dir.mkdir()
    (job_dir / "job.json").write_text(json.dumps(
        {"id": "5", "targets": ["127.0.0.1"], "ports": ports, "engine": engine}
    ))


def test_scan_child_asks_for_the_credential_only_when_needed(
    services: dict[str, Service], tmp_path: Path,
) -> None:
    """The child process protocol: one request byte, then the plaintext over a pipe."""
    job_dir = tmp_path / "job"
    _write_job(job_dir, f"{services['web'].port},{services['ssh'].port}")
    req_r, req_w = os.pipe()
    cred_r, cred_w = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.scan", str(job_dir), "--cred-request-fd", str(req_w),
         "--cred-fd", str(cred_r), "--banner-timeout", "0.3"],
        pass_fds=(req_w, cred_r), stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    os.close(req_w)
    os.close(cred_r)
    assert os.read(req_r, 1) == b"?"
    os.write(cred_w, cred_plain())
    os.close(cred_w)
    _, err = proc.communicate(timeout=60)
    os.close(req_r)
    assert proc.returncode == 0, err
    body = (job_dir / RESULT_FILE).read_bytes()
    assert b"Welcome-Operator-Page" in body and b"CANARY" not in body
    assert b"CANARY" not in err and b"scan-user" not in err


def test_scan_child_never_asks_without_a_401(services: dict[str, Service], tmp_path: Path) -> None:
    job_dir = tmp_path / "job"
    _write_job(job_dir, str(services["ftp"].port))
    req_r, req_w = os.pipe()
    cred_r, cred_w = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.scan", str(job_dir), "--cred-request-fd", str(req_w),
         "--cred-fd", str(cred_r)],
        pass_fds=(req_w, cred_r), stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    os.close(req_w)
    os.close(cred_r)
    proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert os.read(req_r, 1) == b""  # EOF: the child exited without asking
    os.close(req_r)
    os.close(cred_w)


def test_scan_child_bad_job_is_one_line(tmp_path: Path) -> None:
    job_dir = tmp_path / "job"
    _write_job(job_dir, "0-99999")
    r = subprocess.run([sys.executable, "-m", "agent.scan", str(job_dir)], capture_output=True,
                       text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "unusable" in r.stderr


@pytest.mark.skipif(nmap.nmap_path() is None, reason="nmap is not installed")
def test_scan_child_nmap_engine_writes_xml_to_the_job_dir(
    services: dict[str, Service], tmp_path: Path,
) -> None:
    job_dir = tmp_path / "job"
    _write_job(job_dir, str(services["ssh"].port), engine="nmap")
    r = subprocess.run([sys.executable, "-m", "agent.scan", str(job_dir)], capture_output=True,
                       text=True, timeout=180, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr
    assert (job_dir / "nmap.xml").exists()
    doc = json.loads((job_dir / RESULT_FILE).read_bytes())
    assert doc["engine"] == "nmap"
    assert [p["port"] for h in doc["hosts"] for p in h["ports"]] == [services["ssh"].port]


def _imports_of(path: Path, known: set[str]) -> set[str]:
    """Modules of *known* that *path* imports, at module level or inside functions (a lazy
    import is still a dependency: it only hides the circle until the function runs)."""
    import ast

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        found |= {n for n in names if n in known}
    return found


def test_agent_and_protocol_import_no_circle() -> None:
    """The agent's and protocol's modules form a DAG (credcheck <-> sshcheck was the last
    circle: both now take pin matching from protocol.scope)."""
    modules = {}
    for pkg in ("agent", "protocol"):
        for f in (ROOT / pkg).rglob("*.py"):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = f
    graph = {m: _imports_of(f, set(modules)) - {m} for m, f in modules.items()}
    done: set[str] = set()

    def visit(module: str, stack: list[str]) -> None:
        if module in stack:
            raise AssertionError("import circle: " + " -> ".join([*stack[stack.index(module):], module]))
        if module in done:
            return
        for dep in sorted(graph[module]):
            visit(dep, [*stack, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
