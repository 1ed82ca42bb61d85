"""Authenticated SSH check (paramiko): log in, run a fixed read-only inventory, log out.

Runs in a worker thread (paramiko is blocking). The caller has already decided, from the
sealed scope, that this (address, port, ssh) may receive the credential; here the host key
of this very connection is checked against the scope's SSH pins before authenticating.

Only the commands in INVENTORY are ever run: fixed strings, no input from the job, the
platform or the target goes into them. Their output (printable text, bounded) goes into the
result document; the secret never does.

Limits of Python key hygiene, as for AESGCM elsewhere: paramiko takes the password as an
immutable bytes object and parses a private key into its own objects, which live until
garbage-collected. Our own buffers are overwritten by the caller.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import socket
from typing import Final

import paramiko

from agent.scan.model import AUTH_ACCEPTED, AUTH_FAILED, AUTH_REJECTED
from protocol import credential as credmod
from protocol import scope as scopemod

INVENTORY: Final = ("uname -a", "cat /etc/os-release", "id")
MAX_OUTPUT: Final = 4096  # bytes kept per command
_NONPRINTABLE = re.compile(r"[^\x20-\x7e\n]+")

# paramiko logs handshakes at INFO; our log lines are the ones that matter.
logging.getLogger("paramiko").setLevel(logging.WARNING)

Outcome = tuple[str, str, dict[str, str] | None]


def _load_key(secret: bytearray) -> paramiko.PKey:
    text = io.StringIO(secret.decode("ascii", errors="replace"))
    for cls in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        text.seek(0)
        try:
            key: paramiko.PKey = cls.from_private_key(text)
            return key
        except (paramiko.SSHException, ValueError):
            continue
    raise paramiko.SSHException("private key is not an unencrypted Ed25519, ECDSA or RSA key")


def _run(transport: paramiko.Transport, command: str, timeout: float) -> str:
    chan = transport.open_session(timeout=timeout)
    try:
        chan.settimeout(timeout)
        chan.exec_command(command)
        out = bytearray()
        while len(out) < MAX_OUTPUT:
            chunk = chan.recv(MAX_OUTPUT - len(out))
            if not chunk:
                break
            out += chunk
    finally:
        chan.close()
    return _NONPRINTABLE.sub(" ", out.decode("utf-8", errors="replace")).strip()


def ssh_check(
    address: str,
    port: int,
    username: str,
    kind: str,
    secret: bytearray,
    pins: tuple[str, ...],
    timeout: float,
) -> Outcome:
    """(auth outcome, banner, inventory or None). Never raises for network trouble."""
    try:
        sock = socket.create_connection((address, port), timeout=timeout)
    except OSError as e:
        return AUTH_FAILED, f"connection failed ({type(e).__name__})", None
    transport = paramiko.Transport(sock)
    try:
        transport.banner_timeout = timeout
        transport.auth_timeout = timeout
        transport.start_client(timeout=timeout)
        banner = transport.remote_version or ""
        host_key = transport.get_remote_server_key()
        if not scopemod.pin_matches(hashlib.sha256(host_key.asbytes()).hexdigest(), pins):
            return scopemod.CERT_MISMATCH, "host key is not the pinned one", None
        try:
            if kind == credmod.KIND_SSH_KEY:
                transport.auth_publickey(username, _load_key(secret))
            else:
                # paramiko encodes the password with Message.add_string, which takes bytes
                # as well (the stub says str): a str would add one more decoded copy.
                password = bytes(secret)
                transport.auth_password(username, password, fallback=False)  # type: ignore[arg-type]
        except paramiko.AuthenticationException:
            return AUTH_REJECTED, banner, None
        if not transport.is_authenticated():
            return AUTH_REJECTED, banner, None
        inventory = {cmd: _run(transport, cmd, timeout) for cmd in INVENTORY}
        first = inventory.get("uname -a", "").splitlines()[:1]
        return AUTH_ACCEPTED, f"{banner} | {first[0]}" if first else banner, inventory
    except (paramiko.SSHException, OSError, EOFError) as e:
        return AUTH_FAILED, f"ssh failed ({type(e).__name__})", None
    finally:
        transport.close()
        sock.close()
