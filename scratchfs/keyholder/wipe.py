"""Overwrite secrets held in mutable buffers (bytes objects cannot be wiped: avoid them for keys)."""

from __future__ import annotations

__all__ = ["wipe"]


def wipe(buf: bytearray | memoryview) -> None:
    """Overwrite every byte of *buf* with zero, in place.

    One slice assignment, not a Python loop: a 64 KiB credential is wiped in microseconds. A
    memoryview is wiped through a flat byte view so that multi-dimensional or typed views of a
    key buffer work too; a read-only view raises TypeError rather than silently keeping the secret.
    """
    view = memoryview(buf).cast("B") if isinstance(buf, memoryview) else buf
    view[:] = bytes(len(view))
