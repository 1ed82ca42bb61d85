"""A real OpenSSH server on loopback for tests and the demo (Debian's /usr/sbin/sshd).

It runs with its own host key, config, authorized_keys and pid file in a temp dir, listens
on 127.0.0.1 only, on a free high port, and lets exactly one local account in
(``AllowUsers``): SSH_USER, created for the run with a random password and removed
afterwards (password authentication checks real accounts: /etc/shadow). Needs root.
"""

from __future__ import annotations

import base64
import hashlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from tools.children import stop_child
from tools.loopback_targets import closed_port

SSHD: Final = "/usr/sbin/sshd"
SSH_USER: Final = "sfs-scan-test"
PRIVSEP_DIR: Final = Path("/run/sshd")


class SshdError(RuntimeError):
    """sshd could not be started (the message says why)."""


def available() -> bool:
    """Whether this machine can run the loopback sshd (binary present, running as root)."""
    return os.path.exists(SSHD) and os.geteuid() == 0


def ensure_user(password: bytes) -> None:
    """Create SSH_USER if missing and set its password (over stdin, never argv)."""
    try:
        pwd.getpwnam(SSH_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/bin/sh", SSH_USER],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
    subprocess.run(
        ["chpasswd"], input=SSH_USER.encode() + b":" + password + b"\n",
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip


def remove_user() -> None:
    """Delete SSH_USER (best effort: a leftover is locked, not usable)."""
    subprocess.run(["usermod", "--lock", SSH_USER], capture_output=True, timeout=30, check=False)
    subprocess.run(["userdel", SSH_USER], capture_output=True, timeout=30, check=False)


def new_client_key(workdir: Path) -> tuple[bytes, bytes]:
    """An Ed25519 client key pair made by ssh-keygen: (OpenSSH private key, public line)."""
    path = workdir / "client_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "scan", "-f", str(path)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    private, public = path.read_bytes(), path.with_suffix(".pub").read_bytes()
    path.unlink()
    return private, public


@dataclass
class Sshd:
    """A running loopback sshd; stop() ends it by PID."""

    proc: subprocess.Popen[bytes]
    port: int
    host_key_sha256: str  # hex SHA-256 of the host key blob (what a scope pins)
    workdir: Path
    keys_dir: Path

    def stop(self) -> None:
        """Terminate our sshd (and only it) and wait for it."""
        stop_child(self.proc, patience=5)
        shutil.rmtree(self.keys_dir, ignore_errors=True)


def start(workdir: Path, authorized_keys: bytes, timeout: float = 10.0) -> Sshd:
    """Start sshd in *workdir* (created) and wait until it accepts connections."""
    workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation chroot
    host_key = workdir / "host_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    blob = host_key.with_suffix(".pub").read_text().split()[1]
    fingerprint = hashlib.sha256(base64.b64decode(blob)).hexdigest()
    # sshd reads authorized_keys as the user, who cannot traverse the caller's 0700 temp
    # dirs: the (public) keys go to a world-readable dir of their own.
    keys_dir = Path(tempfile.mkdtemp(prefix="sfs-sshd-keys-"))
    os.chmod(keys_dir, 0o755)  # noqa: S103 - public keys only; the user must read them
    (keys_dir / "authorized_keys").write_bytes(authorized_keys)
    os.chmod(keys_dir / "authorized_keys", 0o644)
    port = closed_port()
    config = workdir / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\nPidFile {workdir / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {keys_dir / 'authorized_keys'}\nStrictModes no\nUsePAM no\n"
        "PasswordAuthentication yes\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
        f"AllowUsers {SSH_USER}\nPermitRootLogin no\nPrintMotd no\nLogLevel ERROR\n"
        "MaxStartups 10:30:20\nLoginGraceTime 20\nX11Forwarding no\nAllowTcpForwarding no\n"
    )
    proc = subprocess.Popen(
        [SSHD, "-D", "-e", "-f", str(config)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(workdir / "sshd.log", "wb"),
    )  # fmt: skip
    server = Sshd(proc, port, fingerprint, workdir, keys_dir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log = (workdir / "sshd.log").read_text(errors="replace").strip().splitlines()
            raise SshdError(f"sshd exited with {proc.returncode}: {log[-1] if log else 'no output'}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return server
        except OSError:
            time.sleep(0.05)
    server.stop()
    raise SshdError(f"sshd did not listen on 127.0.0.1:{port} within {timeout:g} s")
