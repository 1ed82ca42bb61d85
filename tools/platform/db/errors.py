"""What storage raises: errors the operator can act on (each message says what to do)."""

from __future__ import annotations


class StorageError(Exception):
    """A storage problem the operator can act on (the message says what to do)."""


class Conflict(StorageError):
    """The object exists already, or the request contradicts the stored state."""


class NotFound(StorageError):
    """No such appliance, job or credential."""


class ShredUnproven(StorageError):
    """Deactivation committed, but the wrapped key could not be shown gone from every
    database file; the message says what to do (the command then exits non-zero)."""
