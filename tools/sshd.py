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

SSHD: Final = "/usr/sbin/sshd"
SSH_USER: Final = "sfs-scan-test"
PRIVSEP_DIR: Final = Path("/run/sshd")


class SshdError(RuntimeError):
    """sshd could not be started (the message says why)."""


def available() -> bool:
    """Whether this machine can run the loopback sshd (binary present, running as root)."""
    return os.path.exists(SSHD) and os.geteuid() == 0


def ensure_user(password: bytes, user: str = SSH_USER) -> None:
    """Create *user* if missing and set its password (over stdin, never argv)."""
    try:
        pwd.getpwnam(user)
    except KeyError:
        subprocess.run(
            ["useradd", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/bin/sh", user],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
    subprocess.run(
        ["chpasswd"], input=user.encode() + b":" + password + b"\n",
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip


def remove_user(user: str = SSH_USER) -> None:
    """Delete *user* (best effort: a leftover is locked, not usable)."""
    subprocess.run(["usermod", "--lock", user], capture_output=True, timeout=30, check=False)
    subprocess.run(["userdel", user], capture_output=True, timeout=30, check=False)


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


def _free_port(host: str) -> int:
    s = socket.socket()
    s.bind((host, 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def start(workdir: Path, authorized_keys: bytes, timeout: float = 10.0, listen: str = "127.0.0.1",
          user: str = SSH_USER) -> Sshd:
    """Start sshd in *workdir* (created) and wait until it accepts connections.

    *listen* is the one address it binds (loopback unless a test bed, e.g. the appliance
    test's bridge in its own network namespace, needs another); *user* the one account it
    lets in (a test that runs for many minutes uses its own, so that other tests creating
    and removing SSH_USER meanwhile do not change its password under it).
    """
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
    port = _free_port(listen)
    config = workdir / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress {listen}\nHostKey {host_key}\nPidFile {workdir / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {keys_dir / 'authorized_keys'}\nStrictModes no\nUsePAM no\n"
        "PasswordAuthentication yes\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
        f"AllowUsers {user}\nPermitRootLogin no\nPrintMotd no\nLogLevel ERROR\n"
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
            with socket.create_connection((listen, port), timeout=0.5):
                return server
        except OSError:
            time.sleep(0.05)
    server.stop()
    raise SshdError(f"sshd did not listen on {listen}:{port} within {timeout:g} s")
