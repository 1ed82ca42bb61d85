"""Exceptions raised below the FUSE layer; fuse_ops translates them to errno replies once."""

from __future__ import annotations

import errno as _errno


class ScratchError(Exception):
    """Base of scratchfs's own exceptions. Messages never carry key material or file content."""


class FsError(ScratchError):
    """A POSIX error a namespace or content operation must return to the caller."""

    def __init__(self, errno: int, detail: str = "") -> None:
        self.errno = errno
        super().__init__(f"{_errno.errorcode.get(errno, errno)}{': ' + detail if detail else ''}")


class IntegrityError(ScratchError):
    """Backing data failed authentication or does not match what this process wrote.

    *block* is the plaintext block index (or None when the whole blob is wrong); *reason* says
    which check failed; *ino* is the file's inode number, stamped by the open-file table on the
    way out of a use of the file. The FUSE layer adds the file's path and logs one WARNING line.
    """

    def __init__(self, reason: str, block: int | None = None) -> None:
        self.reason = reason
        self.block = block
        self.ino: int | None = None
        where = f" block={block}" if block is not None else ""
        super().__init__(f"integrity check failed:{where} reason={reason}")


class StoreError(ScratchError):
    """The backing directory cannot be used as a scratchfs store (refused, nothing touched)."""
