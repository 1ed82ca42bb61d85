"""The real CLIs (`scanner-platform`, `scanner-seal`) in subprocesses, against a real server."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from protocol import api, client, credential, sealing
from tests.platform.conftest import HOSTNAME, ServedProcess, run_cli, tls_client
from tools.platform import db

SEAL = [sys.executable, "-m", "tools.seal"]


def one_line_error(proc: subprocess.CompletedProcess[bytes], code: int) -> str:
    err = proc.stderr.decode()
    assert proc.returncode == code, (proc.returncode, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith(("scanner-platform: ", "scanner-seal: ")), err
    return lines[0]


def test_init_creates_private_files_and_prints_no_secret(tmp_path: Path) -> None:
    root = tmp_path / "st"
    proc = run_cli("init", str(root), "--hostname", HOSTNAME)
    assert proc.returncode == 0, proc.stderr
    assert b"PRIVATE" not in proc.stdout + proc.stderr
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    for name in ("ca.key", "server.key", "kek.key", "platform.db"):
        assert stat.S_IMODE((root / name).stat().st_mode) == 0o600, name
    kek = (root / "kek.key").read_bytes()
    assert kek not in proc.stdout + proc.stderr
    storage = db.Storage(root / "platform.db")
    try:
        assert storage.journal_mode() == "wal"
        assert storage.schema_version() == db.SCHEMA_VERSION
    finally:
        storage.close()
    line = one_line_error(run_cli("init", str(root), "--hostname", HOSTNAME), 5)
    assert "already holds a platform" in line


def test_cli_errors_are_one_line_with_exit_codes(tmp_path: Path) -> None:
    root = tmp_path / "st"
    assert run_cli("init", str(root), "--hostname", HOSTNAME).returncode == 0
    one_line_error(run_cli("appliance", "list", state_dir=None), 2)
    one_line_error(run_cli("frobnicate"), 2)
    one_line_error(run_cli("appliance", "add", "bad name!", state_dir=root), 2)
    one_line_error(run_cli("appliance", "list", "--state", str(tmp_path / "nope")), 5)
    one_line_error(run_cli("appliance", "deactivate", "ghost", state_dir=root), 3)
    assert run_cli("appliance", "add", "dup", state_dir=root).returncode == 0
    one_line_error(run_cli("appliance", "add", "dup", state_dir=root), 4)
    one_line_error(run_cli("appliance", "pubkey", "dup", state_dir=root), 4)  # not activated yet
    one_line_error(run_cli("job", "add", "dup", "--targets", "127.0.0.1", "--ports", "0-5", state_dir=root), 2)
    one_line_error(
        run_cli("job", "add", "dup", "--targets", "127.0.0.1", "--ports", "22", state_dir=root), 4
    )  # pending, not active
    one_line_error(run_cli("results", "show", "42", state_dir=root), 3)
    one_line_error(run_cli("results", "show", "x", state_dir=root), 2)
    junk = tmp_path / "junk"
    junk.write_bytes(b"not sealed at all, just text" * 3)
    one_line_error(run_cli("credential", "add", "c", "--appliance", "dup", "--sealed", str(junk), state_dir=root), 2)
    one_line_error(run_cli("syslog", "set", "--host", "h", "--port", "6514", "--ca", str(junk), state_dir=root), 2)
    one_line_error(run_cli("serve", str(tmp_path / "empty")), 5)
    # A second server on a port that is taken.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        line = one_line_error(run_cli("serve", str(root), "--listen", f"127.0.0.1:{port}"), 1)
        assert "cannot listen" in line


def test_seal_cli_errors(tmp_path: Path) -> None:
    scope_flags = ["--username", "u", "--target", "10.0.0.1", "--ports", "22", "--protocol", "ssh"]

    def seal(key_file: Path, *extra: str, secret: bytes = b"s") -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*SEAL, "--appliance-key", str(key_file), *extra], input=secret,
                              capture_output=True, check=False)  # fmt: skip

    key = tmp_path / "pub.pem"
    key.write_bytes(b"garbage")
    assert b"hybrid public key" in one_line_error(seal(key, *scope_flags), 2).encode()
    one_line_error(seal(tmp_path / "missing", *scope_flags), 2)
    _, pub = sealing.generate_keypair()
    key.write_bytes(sealing.public_key_to_pem(pub))
    assert "seal-key upgrade" in one_line_error(seal(key, *scope_flags), 2)  # a v1 appliance key
    _, hpub = sealing.generate_hybrid_keypair()
    key.write_bytes(sealing.hybrid_public_to_pem(hpub))
    assert "no secret" in one_line_error(seal(key, *scope_flags, secret=b"\n"), 2)
    assert "required" in one_line_error(seal(key, "--username", "u"), 2)  # no scope: refused
    bad = ["--username", "u", "--ports", "22", "--protocol", "ssh"]
    assert "CIDR" in one_line_error(seal(key, *bad, "--target", "10.0.0.0/99"), 2)
    assert "port" in one_line_error(seal(key, "--username", "u", "--target", "10.0.0.1", "--ports", "0",
                                         "--protocol", "ssh"), 2)  # fmt: skip
    assert "pin" in one_line_error(seal(key, *scope_flags, "--pin-tls-sha256", "abc"), 2)
    assert "':'" in one_line_error(seal(key, "--username", "a:b", *scope_flags[2:]), 2)
    assert "http-basic" in one_line_error(seal(key, *scope_flags, "--protocol", "http-basic", "--kind", "ssh-key"), 2)
    good = seal(key, *scope_flags, "--expires", "2030-01-01T00:00", "--force", secret=b"pw\n")
    assert good.returncode == 0 and sealing.check_format(good.stdout) == 2
    header = json.loads(sealing.public_header(good.stdout))
    assert header["expires"] == 1893456000.0 and header["targets"] == ["10.0.0.1"]


async def test_full_flow_through_the_cli(served: ServedProcess, tmp_path: Path) -> None:
    root = tmp_path / "served"
    url = f"https://{HOSTNAME}:{served.port}"
    ca_pem = (root / "ca.pem").read_bytes()

    proc = run_cli("appliance", "add", "edge1", "--code-ttl", "600", state_dir=root)
    assert proc.returncode == 0, proc.stderr
    code = proc.stdout.decode().strip()
    assert len(code) == 23 and code.count("-") == 3
    for p in root.iterdir():  # SQLite: the database file; PostgreSQL: the URL file only
        assert code.encode() not in p.read_bytes(), p

    key_pem, csr = client.new_client_key_and_csr("edge1")
    xpriv, xpub = sealing.generate_keypair()
    hpriv, hpub = sealing.generate_hybrid_keypair()
    res = await client.PlatformClient(url, tls_client(ca_pem)).activate(code, csr, xpub, hpub)
    assert res.appliance == "edge1" and res.ca_pem == ca_pem
    c = client.PlatformClient(url, tls_client(ca_pem, res.certificate_pem, key_pem))
    await c.open_session(1, "tpm")

    # Customer side: export the key, seal a credential, hand the blob to the platform.
    pub_file = tmp_path / "edge1.pub"
    proc = run_cli("appliance", "pubkey", "edge1", state_dir=root)
    assert proc.returncode == 0
    pub_file.write_bytes(proc.stdout)
    secret = b"canary-password-4711"
    x_file = tmp_path / "edge1-x25519.pub"
    x_file.write_bytes(run_cli("appliance", "pubkey", "edge1", "--x25519", state_dir=root).stdout)
    scope_flags = ["--username", "ftpuser", "--target", "127.0.0.0/8", "--target", "localhost",
                   "--ports", "21-22", "--protocol", "ssh"]  # fmt: skip
    one_line_error(subprocess.run([*SEAL, "--appliance-key", str(x_file), *scope_flags], input=secret,
                                  capture_output=True, check=False), 2)  # a v1 key: upgrade first
    sealed = subprocess.run(
        [*SEAL, "--appliance-key", str(pub_file), *scope_flags], input=secret, capture_output=True, check=True
    ).stdout
    assert secret not in sealed and b"127.0.0.0/8" in sealed  # the public copy of the scope
    sealed_file = tmp_path / "cred.sealed"
    sealed_file.write_bytes(sealed)
    proc = run_cli("credential", "add", "ftp", "--appliance", "edge1", "--sealed", str(sealed_file), state_dir=root)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli(
        "job",
        "add",
        "edge1",
        "--targets",
        "127.0.0.1,localhost",
        "--ports",
        "21,80-82,22",
        "--credential",
        "ftp",
        state_dir=root,
    )
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.decode().strip()
    # Retargeting the credential at another host is refused by the platform (exit 6).
    proc = run_cli("job", "add", "edge1", "--targets", "192.0.2.1", "--ports", "22", "--credential", "ftp",
                   state_dir=root)  # fmt: skip
    one_line_error(proc, 6)
    assert b"outside the scope" in proc.stderr

    ca_file = tmp_path / "syslog-ca.pem"
    ca_file.write_bytes(ca_pem)
    assert (
        run_cli(
            "syslog", "set", "--host", "127.0.0.1", "--port", "6514", "--ca", str(ca_file), state_dir=root
        ).returncode
        == 0
    )
    assert run_cli("syslog", "show", state_dir=root).stdout.decode().strip() == "127.0.0.1:6514"
    cfg = await c.config()
    assert cfg.syslog is not None and cfg.syslog.port == 6514

    job = await c.next_job(wait=10)
    assert job is not None and job.id == job_id
    assert job.targets == ("127.0.0.1", "localhost") and job.ports == "21-22,80-82"
    assert job.credential is not None
    meta, got = credential.unpack(sealing.open_any(xpriv, hpriv, job.credential, api.SEAL_CONTEXT_CREDENTIAL))
    assert bytes(got) == secret and meta.username == "ftpuser" and "localhost" in meta.scope.targets
    doc = {
        "job": job.id,
        "engine": "builtin",
        "hosts": [
            {
                "target": "127.0.0.1",
                "address": "127.0.0.1",
                "ports": [{"port": 21, "state": "open", "service": "ftp", "banner": "220 hello\r\n"}],
            }
        ],
    }
    body = json.dumps(doc).encode()
    await c.upload_result(job.id, body)

    proc = run_cli("results", "show", job_id, state_dir=root)
    out = proc.stdout.decode()
    assert proc.returncode == 0 and "TARGET" in out and "220 hello.." in out and "ftp" in out
    proc = run_cli("results", "show", job_id, "--json", state_dir=root)
    shown = json.loads(proc.stdout)
    assert shown["result"] == doc and shown["job"] == job_id
    listing = json.loads(run_cli("job", "list", "--json", state_dir=root).stdout)
    assert [(j["id"], j["state"], j["attempts"]) for j in listing] == [(job_id, "done", 1)]
    assert "edge1" in run_cli("job", "list", state_dir=root).stdout.decode()
    apps = json.loads(run_cli("appliance", "list", "--json", state_dir=root).stdout)
    assert [(a["name"], a["state"]) for a in apps] == [("edge1", "active")]

    proc = run_cli("appliance", "deactivate", "edge1", state_dir=root)
    assert proc.returncode == 0, proc.stderr
    with pytest.raises(client.DeactivatedError):
        await c.next_job(wait=0)
    crl = run_cli("crl", state_dir=root)
    assert crl.returncode == 0 and b"BEGIN X509 CRL" in crl.stdout
    one_line_error(run_cli("appliance", "deactivate", "edge1", state_dir=root), 4)

    # Nothing secret in the platform's files or its log.
    log = served.log_path.read_bytes()
    for blob in (secret, code.encode(), key_pem):
        assert blob not in log
        for p in root.iterdir():
            assert blob not in p.read_bytes(), p

    os.kill(served.proc.pid, signal.SIGTERM)
    assert served.proc.wait(timeout=15) == 0
    assert not (root / "serve.addr").exists()


def test_migrations_upgrade_and_refuse_newer(tmp_path: Path, database_url: str | None) -> None:
    target: Path | str = database_url or tmp_path / "m.db"
    s = db.Storage(target, upto=1)
    assert s.schema_version() == 1
    s.execute_for_tests("INSERT INTO settings (key, value) VALUES ('x', '1')")
    s.close()
    s2 = db.Storage(target)
    try:
        assert s2.schema_version() == db.SCHEMA_VERSION
        assert s2.get_setting("x") == 1
        if database_url is None:
            s2._db.execute(f"PRAGMA user_version = {db.SCHEMA_VERSION + 1}")
        else:
            s2.execute_for_tests("INSERT INTO schema_version (version) VALUES (?)", (db.SCHEMA_VERSION + 1,))
    finally:
        s2.close()
    with pytest.raises(db.StorageError, match="newer than this platform"):
        db.Storage(target)
