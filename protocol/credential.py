"""What is inside a sealed credential (sealing v2): metadata with the scope, then the secret.

Plaintext layout (sealed with context b"credential"; the scope's canonical bytes are also
the blob's public header)::

    metadata length (2, big-endian) | metadata (canonical JSON) | secret bytes

metadata = {"v": 1, "kind": "password" | "ssh-key", "username": str, "scope": {...}}.
For "password" the secret is the password alone; for "ssh-key" it is an OpenSSH/PEM
private key. The username is not secret. Pure; the secret stays in bytearrays.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Final

from protocol.scope import Scope, ScopeError

KIND_PASSWORD: Final = "password"  # noqa: S105 - a kind label, not a password
KIND_SSH_KEY: Final = "ssh-key"
KINDS: Final = (KIND_PASSWORD, KIND_SSH_KEY)
MAX_USERNAME: Final = 128
MAX_METADATA: Final = 32 * 1024


class CredentialError(ValueError):
    """A credential's plaintext is malformed (never carries secret bytes)."""


@dataclass(frozen=True)
class Metadata:
    """The non-secret part of a credential."""

    kind: str
    username: str
    scope: Scope

    def to_bytes(self) -> bytes:
        """Canonical JSON."""
        doc = {"v": 1, "kind": self.kind, "username": self.username, "scope": self.scope.to_json()}
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Metadata:
        """Parse and validate; raise CredentialError."""
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("v") != 1:
                raise CredentialError("credential metadata has an unknown version")
            kind, username = doc.get("kind"), doc.get("username")
            if kind not in KINDS:
                raise CredentialError("credential kind is unknown")
            if not isinstance(username, str) or not 0 < len(username) <= MAX_USERNAME:
                raise CredentialError("credential username is missing or too long")
            return cls(str(kind), username, Scope.from_json(doc.get("scope")))
        except (ValueError, UnicodeDecodeError) as e:
            if isinstance(e, CredentialError):
                raise
            if isinstance(e, ScopeError):
                raise CredentialError(str(e)) from None
            raise CredentialError("credential metadata is not JSON") from None


def validate_username(username: str) -> None:
    """Usernames go into HTTP Basic (no ':') and SSH; refuse control characters."""
    if not 0 < len(username) <= MAX_USERNAME:
        raise CredentialError(f"username must be 1-{MAX_USERNAME} characters")
    if ":" in username or any(ord(c) < 0x20 or ord(c) == 0x7F for c in username):
        raise CredentialError("username must not contain ':' or control characters")


def pack(meta: Metadata, secret: bytearray) -> bytearray:
    """The plaintext to seal; the caller wipes both *secret* and the returned buffer."""
    head = meta.to_bytes()
    out = bytearray(struct.pack(">H", len(head)))
    out += head
    out += secret
    return out


def unpack(plaintext: bytearray) -> tuple[Metadata, bytearray]:
    """Split an opened credential; the returned secret is a new bytearray to wipe after use."""
    if len(plaintext) < 2:
        raise CredentialError("credential plaintext is truncated")
    (n,) = struct.unpack(">H", plaintext[:2])
    if n > MAX_METADATA or len(plaintext) < 2 + n:
        raise CredentialError("credential metadata length is out of bounds")
    meta = Metadata.from_bytes(bytes(plaintext[2 : 2 + n]))
    secret = plaintext[2 + n :]  # slicing a bytearray yields a bytearray
    if not secret:
        raise CredentialError("credential holds no secret")
    return meta, secret
