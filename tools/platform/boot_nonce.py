"""Stateless nonces for boot reports (``POST /v1/attestation/boot-nonce``). Pure: no I/O.

The boot-report nonce is handed to anyone who asks (an appliance whose TPM refused to
unseal has no client key to authenticate with), so it must not cost the platform memory
or a database row: an untrusted party could ask for millions. It is self-contained
instead, NONCE_BYTES long::

    issued (8 bytes, big-endian microseconds since the epoch) || random (8) || tag (16)

where tag is HMAC-SHA256 under a key derived from the platform's KEK (so every node of
one platform issues and accepts the same nonces, and nobody else can mint one) over the
first 16 bytes, truncated. `check` accepts a nonce only while it is younger than
api.BOOT_NONCE_TTL; replay within that window is stopped by the report's consumer, which
remembers per appliance the issue time of the last report it accepted
(`db.attestation.Attestations.claim_boot_report`): one integer per enrolled appliance.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from protocol import api

_LABEL: Final = b"scanner-platform boot-report nonce v1"
_TAG_BYTES: Final = 16
_BODY_BYTES: Final = api.NONCE_BYTES - _TAG_BYTES  # issued (8) || random (8)
_SKEW: Final = 5.0  # seconds a nonce may seem to come from the future (another node's clock)


class NonceRejected(Exception):
    """The nonce is not one of ours, or it expired (the message says which, for the log)."""


class BootNonces:
    """Issues and checks boot-report nonces under a key derived from the platform KEK."""

    def __init__(self, kek: bytes) -> None:
        self._key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_LABEL).derive(kek)

    def __repr__(self) -> str:
        return "BootNonces()"

    def _tag(self, body: bytes) -> bytes:
        mac = crypto_hmac.HMAC(self._key, hashes.SHA256())
        mac.update(body)
        return mac.finalize()[:_TAG_BYTES]

    def issue(self, now: float) -> bytes:
        """A fresh nonce, issued at *now* (epoch seconds)."""
        body = int(now * 1_000_000).to_bytes(8, "big") + secrets.token_bytes(_BODY_BYTES - 8)
        return body + self._tag(body)

    def check(self, nonce: bytes, now: float) -> int:
        """The nonce's issue time in microseconds, if we issued it and it has not expired."""
        if len(nonce) != api.NONCE_BYTES:
            raise NonceRejected("the nonce has the wrong length")
        body, tag = nonce[:_BODY_BYTES], nonce[_BODY_BYTES:]
        if not hmac.compare_digest(self._tag(body), tag):
            raise NonceRejected("the nonce was not issued by this platform")
        issued = int.from_bytes(body[:8], "big")
        age = now - issued / 1_000_000
        if age > api.BOOT_NONCE_TTL or age < -_SKEW:
            raise NonceRejected("the nonce expired")
        return issued
