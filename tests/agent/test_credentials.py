"""The sealed scope is enforced by the scan child: real loopback listeners that record every
byte they receive, and a grep of those bytes for the secret and its base64."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.scan.runner import RESULT_FILE
from protocol import credential, scope
from tools import sshd as sshdmod
from tools.demo import ROOT
from tools.loopback_targets import Service, start_http_auth_service

USER = "scan-user"
PASSWORD = b"pw-CANARY-4d1f9a"
PAIR = USER.encode() + b":" + PASSWORD
FORBIDDEN = (PASSWORD, base64.b64encode(PAIR), base64.b64encode(PASSWORD))


def make_tls(tmp: Path, name: str) -> tuple[ssl.SSLContext, str]:
    """A self-signed server certificate: (server context, SHA-256 hex of its DER)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path, key_path = tmp / f"{name}.crt", tmp / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_path, key_path)
    return ctx, hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def plaintext_for(
    sc: scope.Scope, secret: bytes = PASSWORD, kind: str = credential.KIND_PASSWORD, user: str = USER
) -> bytes:
    """What the agent hands the scan child after opening the seal."""
    buf = credential.pack(credential.Metadata(kind, user, sc), bytearray(secret))
    return bytes(buf)


def run_child(job_dir: Path, targets: list[str], ports: list[int], plaintext: bytes) -> tuple[dict, bytes]:
    """Run `python -m agent.scan` like the agent does; return (result doc, stderr)."""
    job_dir.mkdir()
    (job_dir / "job.json").write_text(json.dumps(
        {"id": "7", "targets": targets, "ports": ",".join(map(str, sorted(ports))), "engine": "builtin"}
    ))
    req_r, req_w = os.pipe()
    cred_r, cred_w = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.scan", str(job_dir), "--cred-request-fd", str(req_w),
         "--cred-fd", str(cred_r), "--banner-timeout", "0.5", "--connect-timeout", "1"],
        pass_fds=(req_w, cred_r), stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip
    os.close(req_w)
    os.close(cred_r)
    try:
        assert os.read(req_r, 1) == b"?"
        os.write(cred_w, plaintext)
    finally:
        os.close(cred_w)
        os.close(req_r)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    body = (job_dir / RESULT_FILE).read_bytes()
    for secret in FORBIDDEN:
        assert secret not in body and secret not in err
    return json.loads(body), err


def auth_of(doc: dict, address: str, port: int) -> str | None:
    for host in doc["hosts"]:
        if host["address"] == address:
            for p in host["ports"]:
                if p["port"] == port:
                    return p.get("auth")
    raise AssertionError(f"{address}:{port} not in result")


@pytest.fixture
def listeners(tmp_path: Path) -> Iterator[tuple[dict[str, Service], str]]:
    pinned_ctx, pinned_fp = make_tls(tmp_path, "pinned")
    other_ctx, _ = make_tls(tmp_path, "other")
    svcs = {
        "in_scope_tls": start_http_auth_service(PAIR, b"r", b"Inside-Page", "127.0.0.1", pinned_ctx),
        "other_host_tls": start_http_auth_service(PAIR, b"r", b"Other-Host", "127.0.0.2", pinned_ctx),
        "cleartext": start_http_auth_service(PAIR, b"r", b"Clear-Page", "127.0.0.1"),
        "unpinned_tls": start_http_auth_service(PAIR, b"r", b"Unpinned", "127.0.0.1", other_ctx),
    }
    yield svcs, pinned_fp
    for s in svcs.values():
        s.close()


def test_secret_goes_only_to_the_in_scope_pinned_tls_port(
    listeners: tuple[dict[str, Service], str], tmp_path: Path
) -> None:
    svcs, pin = listeners
    ports = [s.port for s in svcs.values()]
    # The scope names every port: only the address, TLS and the pin keep the secret home.
    sc = scope.Scope.build(["127.0.0.1"], ",".join(map(str, ports)), ["http-basic"], tls_sha256=[pin])
    doc, err = run_child(tmp_path / "job", ["127.0.0.1", "127.0.0.2"], ports, plaintext_for(sc))
    assert auth_of(doc, "127.0.0.1", svcs["in_scope_tls"].port) == "accepted"
    assert auth_of(doc, "127.0.0.2", svcs["other_host_tls"].port) == scope.OUT_OF_SCOPE
    assert auth_of(doc, "127.0.0.1", svcs["cleartext"].port) == scope.NEEDS_TLS
    assert auth_of(doc, "127.0.0.1", svcs["unpinned_tls"].port) == scope.CERT_MISMATCH
    assert svcs["in_scope_tls"].authorized == 1
    assert any(s in svcs["in_scope_tls"].received for s in FORBIDDEN)  # the grep can hit
    for name in ("other_host_tls", "cleartext", "unpinned_tls"):
        got = bytes(svcs[name].received)
        assert svcs[name].connections >= 1  # it was probed, so it could have been sent to
        for secret in FORBIDDEN:
            assert secret not in got, name
    assert b"event=credential_refused" in err


def test_cleartext_only_where_allowed_and_hostnames_match_resolved_addresses(
    listeners: tuple[dict[str, Service], str], tmp_path: Path
) -> None:
    svcs, _ = listeners
    port = svcs["cleartext"].port
    sc = scope.Scope.build(["localhost"], str(port), ["http-basic"], cleartext=True)
    doc, _ = run_child(tmp_path / "job", ["127.0.0.1"], [port], plaintext_for(sc))
    assert auth_of(doc, "127.0.0.1", port) == "accepted"
    assert svcs["cleartext"].authorized == 1


def test_a_tls_pin_is_never_downgraded_to_cleartext(
    listeners: tuple[dict[str, Service], str], tmp_path: Path
) -> None:
    """Issue 24 item 4: a scope with cleartext allowed AND a TLS pin (sealed before
    scanner-seal refused the pair, or by another sealer) must not hand HTTP Basic to a port
    that answers the probe in plain HTTP with 401: an active attacker in front of the pinned
    service would be exactly that port."""
    svcs, pin = listeners
    clear, pinned = svcs["cleartext"].port, svcs["in_scope_tls"].port
    sc = scope.Scope.build(
        ["127.0.0.1"], f"{clear},{pinned}", ["http-basic"], cleartext=True, tls_sha256=[pin]
    )
    doc, err = run_child(tmp_path / "job", ["127.0.0.1"], [clear, pinned], plaintext_for(sc))
    assert auth_of(doc, "127.0.0.1", clear) == scope.NEEDS_TLS
    assert svcs["cleartext"].connections >= 1  # it answered the probe with 401: a candidate
    got = bytes(svcs["cleartext"].received)
    assert b"authorization" not in got.lower()
    for secret in FORBIDDEN:
        assert secret not in got
    assert svcs["cleartext"].authorized == 0
    # The pinned TLS port still gets it: the pin, not cleartext, decides.
    assert auth_of(doc, "127.0.0.1", pinned) == "accepted"
    assert b"event=credential_refused" in err and b"reason=credential_needs_tls" in err


def test_scanner_seal_refuses_cleartext_with_a_tls_pin(tmp_path: Path) -> None:
    from protocol import sealing
    from tools.seal.exitcodes import EXIT_OK, EXIT_USAGE

    _, hybrid_public = sealing.generate_hybrid_keypair()
    key = tmp_path / "appliance.pub"
    key.write_bytes(sealing.hybrid_public_to_pem(hybrid_public))
    flags = ["--appliance-key", str(key), "--username", USER, "--target", "127.0.0.1",
             "--ports", "80,443", "--protocol", "http-basic", "--force"]  # fmt: skip

    def seal(*extra: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "tools.seal", *flags, *extra], input=PASSWORD + b"\n",
            capture_output=True, timeout=60, check=False, env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )  # fmt: skip

    refused = seal("--allow-cleartext", "--pin-tls-sha256", "ab" * 32)
    err = refused.stderr.decode()
    assert refused.returncode == EXIT_USAGE, err
    assert refused.stdout == b""  # nothing sealed
    assert err.count("\n") == 1 and err.startswith("scanner-seal: ") and "Traceback" not in err
    assert "--allow-cleartext" in err and "--pin-tls-sha256" in err and "drop one" in err
    # Each flag alone still seals.
    for extra in (["--allow-cleartext"], ["--pin-tls-sha256", "ab" * 32]):
        ok = seal(*extra)
        assert ok.returncode == EXIT_OK, ok.stderr
        assert sealing.check_format(ok.stdout) == 2


def test_expired_scope_sends_nothing(listeners: tuple[dict[str, Service], str], tmp_path: Path) -> None:
    svcs, pin = listeners
    port = svcs["in_scope_tls"].port
    sc = scope.Scope.build(["127.0.0.1"], str(port), ["http-basic"], expires=1000.0, tls_sha256=[pin])
    doc, _ = run_child(tmp_path / "job", ["127.0.0.1"], [port], plaintext_for(sc))
    assert auth_of(doc, "127.0.0.1", port) == scope.EXPIRED
    assert not any(s in svcs["in_scope_tls"].received for s in FORBIDDEN)


def test_protocol_not_in_scope(listeners: tuple[dict[str, Service], str], tmp_path: Path) -> None:
    svcs, _ = listeners
    port = svcs["cleartext"].port
    sc = scope.Scope.build(["127.0.0.1"], str(port), ["ssh"], cleartext=True)
    doc, _ = run_child(tmp_path / "job", ["127.0.0.1"], [port], plaintext_for(sc))
    assert auth_of(doc, "127.0.0.1", port) == scope.OUT_OF_SCOPE
    assert not any(s in svcs["cleartext"].received for s in FORBIDDEN)


def test_scope_decide_unit() -> None:
    sc = scope.Scope.build(["10.0.0.0/24", "db.example"], "22,443", ["ssh", "http-basic"], expires=2000.0)
    names = {"db.example": {"192.0.2.7"}}
    assert sc.decide("10.0.0.9", names, 22, "ssh", False, 1000.0) is None
    assert sc.decide("192.0.2.7", names, 443, "http-basic", True, 1000.0) is None
    assert sc.decide("192.0.2.8", names, 443, "http-basic", True, 1000.0) == scope.OUT_OF_SCOPE
    assert sc.decide("10.0.0.9", names, 80, "ssh", False, 1000.0) == scope.OUT_OF_SCOPE
    assert sc.decide("10.0.0.9", names, 443, "http-basic", False, 1000.0) == scope.NEEDS_TLS
    assert sc.decide("10.0.0.9", names, 22, "ssh", False, 2000.0) == scope.EXPIRED
    assert sc.covers_job_target("10.0.0.128/25") and not sc.covers_job_target("10.0.0.0/23")
    assert sc.covers_job_target("DB.example") and not sc.covers_job_target("other.example")
    assert scope.Scope.from_bytes(sc.to_bytes()) == sc
    clear = scope.Scope.build(["10.0.0.0/24"], "80", ["http-basic"], cleartext=True)
    assert clear.decide("10.0.0.9", {}, 80, "http-basic", False, 1000.0) is None
    pinned = scope.Scope.build(["10.0.0.0/24"], "80", ["http-basic"], cleartext=True, tls_sha256=["ab" * 32])
    assert pinned.decide("10.0.0.9", {}, 80, "http-basic", False, 1000.0) == scope.NEEDS_TLS
    assert pinned.decide("10.0.0.9", {}, 80, "http-basic", True, 1000.0) is None
    assert clear.sends_cleartext and not pinned.sends_cleartext
    with pytest.raises(scope.ScopeError):
        scope.Scope.build(["10.0.0.0/33"], "22", ["ssh"])
    with pytest.raises(scope.ScopeError):
        scope.Scope.build(["10.0.0.1"], "22", ["telnet"])


# --- SSH against Debian's sshd ---------------------------------------------------------

SSH_PASSWORD = b"ssh-pw-CANARY-" + os.urandom(6).hex().encode()


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[sshdmod.Sshd, bytes]]:
    if not sshdmod.available():
        pytest.skip("needs root and /usr/sbin/sshd (openssh-server)")
    work = tmp_path_factory.mktemp("sshd")
    private, public = sshdmod.new_client_key(work)
    sshdmod.ensure_user(SSH_PASSWORD)
    server = sshdmod.start(work / "srv", public)
    yield server, private
    server.stop()
    sshdmod.remove_user()


def _ssh_result(doc: dict, port: int) -> dict:
    for p in doc["hosts"][0]["ports"]:
        if p["port"] == port:
            return dict(p)
    raise AssertionError("ssh port not in result")


def test_ssh_password_and_key_accepted_with_inventory(sshd: tuple[sshdmod.Sshd, bytes], tmp_path: Path) -> None:
    server, private = sshd
    sc = scope.Scope.build(["127.0.0.1"], str(server.port), ["ssh"], ssh_sha256=[server.host_key_sha256])
    doc, _ = run_child(tmp_path / "pw", ["127.0.0.1"], [server.port],
                       plaintext_for(sc, SSH_PASSWORD, user=sshdmod.SSH_USER))
    entry = _ssh_result(doc, server.port)
    assert entry["auth"] == "accepted", entry
    assert entry["inventory"]["uname -a"].startswith("Linux")
    assert "ID=" in entry["inventory"]["cat /etc/os-release"]
    assert sshdmod.SSH_USER in entry["inventory"]["id"]
    assert SSH_PASSWORD not in json.dumps(doc).encode()
    key_plain = credential.pack(credential.Metadata(credential.KIND_SSH_KEY, sshdmod.SSH_USER, sc), bytearray(private))
    doc, err = run_child(tmp_path / "key", ["127.0.0.1"], [server.port], bytes(key_plain))
    entry = _ssh_result(doc, server.port)
    assert entry["auth"] == "accepted" and "Linux" in entry["inventory"]["uname -a"]
    assert b"OPENSSH PRIVATE KEY" not in json.dumps(doc).encode() and b"PRIVATE" not in err


def test_ssh_rejected_and_unpinned_host_key(sshd: tuple[sshdmod.Sshd, bytes], tmp_path: Path) -> None:
    server, _ = sshd
    sc = scope.Scope.build(["127.0.0.1"], str(server.port), ["ssh"])
    wrong = credential.pack(credential.Metadata(credential.KIND_PASSWORD, sshdmod.SSH_USER, sc), bytearray(b"nope"))
    doc, _ = run_child(tmp_path / "wrong", ["127.0.0.1"], [server.port], bytes(wrong))
    entry = _ssh_result(doc, server.port)
    assert entry["auth"] == "rejected" and "inventory" not in entry
    _, other_key = sshdmod.new_client_key(tmp_path)
    other = "00" * 32
    pinned = scope.Scope.build(["127.0.0.1"], str(server.port), ["ssh"], ssh_sha256=[other])
    plain = credential.pack(credential.Metadata(credential.KIND_PASSWORD, sshdmod.SSH_USER, pinned),
                            bytearray(SSH_PASSWORD))
    doc, _ = run_child(tmp_path / "pin", ["127.0.0.1"], [server.port], bytes(plain))
    assert _ssh_result(doc, server.port)["auth"] == scope.CERT_MISMATCH
    assert other_key  # a second key pair was made: ssh-keygen works twice in one dir


async def test_agent_does_not_open_a_v1_credential_without_scope(tmp_path: Path) -> None:
    """A credential sealed before v2 has no scope: the agent never decrypts it and the
    child, reading EOF, reports credential_unusable (what to do is in the agent's log)."""
    from agent.jobs import CREDENTIAL_FILE, JobRunner, JobSettings
    from agent.scan.model import ScanOptions
    from protocol import sealing

    _, xpub = sealing.generate_keypair()
    jdir = tmp_path / "job"
    jdir.mkdir()
    (jdir / CREDENTIAL_FILE).write_bytes(sealing.seal(xpub, b"user:pw", b"credential"))

    def never_open(_blob: bytes, _ctx: bytes) -> bytearray:
        raise AssertionError("a v1 credential was opened")

    runner = JobRunner(None, tmp_path, never_open, lambda: 0.0, JobSettings(ScanOptions()))  # type: ignore[arg-type]
    req_r, req_w = os.pipe()
    cred_r, cred_w = os.pipe()
    os.write(req_w, b"?")
    await runner._serve_credential(jdir, req_r, cred_w)
    assert os.read(cred_r, 100) == b""  # EOF, nothing written
    assert runner.credential_opens == 0
    os.close(req_w)
    os.close(cred_r)
