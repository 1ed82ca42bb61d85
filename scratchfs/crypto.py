"""Key material and the AEAD: the only module that touches cryptographic primitives.

Python cannot promise that no copy of a key survives (the AEAD object keeps its own copy
inside the `cryptography` package until it is garbage-collected, and bytes objects are
immutable). What we can do: keep our copy in a bytearray that `destroy()` overwrites, drop
the AEAD object at the same time, keep the process non-dumpable and its memory locked (see
keyholder/hardening.py), and never let a key reach repr(), a log or an exception message.
"""

from __future__ import annotations

import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from scratchfs.errors import IntegrityError

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
MAX_COUNTER = (1 << (8 * NONCE_BYTES)) - 1


class FileKey:
    """One file's AES-256-GCM key, held only in this process's memory."""

    __slots__ = ("_aead", "_key")

    def __init__(self, key: bytearray) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError("a file key is 32 bytes")
        self._key: bytearray | None = key
        self._aead: AESGCM | None = AESGCM(bytes(key))

    @classmethod
    def new(cls) -> FileKey:
        """Draw a fresh random key from the OS CSPRNG."""
        return cls(bytearray(secrets.token_bytes(KEY_BYTES)))

    @property
    def destroyed(self) -> bool:
        """True once destroy() ran: the key can no longer seal or open anything."""
        return self._aead is None

    def seal(self, counter: int, plaintext: bytes | bytearray | memoryview, aad: bytes) -> tuple[bytes, bytes]:
        """Encrypt *plaintext* under nonce = *counter*; returns (nonce, ciphertext ‖ tag).

        The two parts are returned separately so that writers can hand them to pwritev()
        without concatenating (a copy that costs as much as the encryption itself).
        """
        aead = self._require()
        if not 0 < counter <= MAX_COUNTER:
            raise ValueError("nonce counter out of range")
        nonce = counter.to_bytes(NONCE_BYTES, "big")
        return nonce, aead.encrypt(nonce, plaintext, aad)

    def seal_into(self, counter: int, plaintext: bytes | bytearray | memoryview, aad: bytes, out: memoryview) -> None:
        """Write nonce ‖ ciphertext ‖ tag into *out* (exactly len(plaintext) + 28 bytes), no copies."""
        aead = self._require()
        if not 0 < counter <= MAX_COUNTER:
            raise ValueError("nonce counter out of range")
        nonce = counter.to_bytes(NONCE_BYTES, "big")
        out[:NONCE_BYTES] = nonce
        aead.encrypt_into(nonce, plaintext, aad, out[NONCE_BYTES:])

    def open_into(self, counter: int, record: memoryview, aad: bytes, out: memoryview) -> None:
        """Authenticate *record* and decrypt it into *out* (len(record) - 28 bytes)."""
        aead = self._require()
        if len(record) < NONCE_BYTES + TAG_BYTES:
            raise IntegrityError("record too short")
        if record[:NONCE_BYTES] != counter.to_bytes(NONCE_BYTES, "big"):
            raise IntegrityError("unexpected nonce (replayed or moved block)")
        try:
            aead.decrypt_into(record[:NONCE_BYTES], record[NONCE_BYTES:], aad, out)
        except InvalidTag:
            out[:] = bytes(len(out))  # never leave unauthenticated plaintext behind
            raise IntegrityError("authentication tag mismatch") from None

    def open(self, counter: int, record: bytes | memoryview, aad: bytes) -> bytes:
        """Authenticate and decrypt a record made by seal(); IntegrityError on any mismatch."""
        aead = self._require()
        record = memoryview(record)
        if len(record) < NONCE_BYTES + TAG_BYTES:
            raise IntegrityError("record too short")
        if bytes(record[:NONCE_BYTES]) != counter.to_bytes(NONCE_BYTES, "big"):
            # A valid record with another counter is a replayed or moved block.
            raise IntegrityError("unexpected nonce (replayed or moved block)")
        try:
            return aead.decrypt(record[:NONCE_BYTES], record[NONCE_BYTES:], aad)
        except InvalidTag:
            raise IntegrityError("authentication tag mismatch") from None

    def destroy(self) -> None:
        """Overwrite our copy of the key and drop the AEAD object (idempotent)."""
        if self._key is not None:
            for i in range(len(self._key)):
                self._key[i] = 0
            self._key = None
        self._aead = None

    def _require(self) -> AESGCM:
        if self._aead is None:
            raise IntegrityError("file key already destroyed")
        return self._aead

    def __repr__(self) -> str:
        return f"<FileKey destroyed={self.destroyed}>"

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("FileKey cannot be pickled")
