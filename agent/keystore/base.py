"""The keystore interface shared by the backends."""

from __future__ import annotations

import abc
import os
import re
from pathlib import Path
from typing import Any, ClassVar, Final

from agent.errors import StateError

_NAME_RE: Final = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
BOOT_COUNTER_FILE: Final = "boot-counter"


def check_name(name: str) -> str:
    """Secret names become file names: keep them to a safe alphabet."""
    if not _NAME_RE.match(name) or ".." in name:
        raise ValueError(f"invalid secret name {name!r}")
    return name


def write_new(path: Path, data: bytes | bytearray) -> None:
    """Create *path* 0600 (never overwrite), write *data*, fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # umask must not widen or narrow what we meant
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def store_atomically(path: Path, data: bytes | bytearray) -> None:
    """Create *path* (0600) with *data* all at once, never replacing an existing file.

    Written to a temporary name, fsynced, then hard-linked into place: link() fails with
    EEXIST instead of overwriting, and a crash leaves either no file or the whole file.
    """
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    write_new(tmp, data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise StateError(f"{path} exists already", "keep it; secrets are never replaced") from None
    finally:
        tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_into(path: Path, limit: int = 1024 * 1024) -> bytearray:
    """Read a whole file into a bytearray (wipeable, unlike bytes)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise StateError(f"{path} is larger than {limit} bytes", "re-activate the appliance")
        buf = bytearray(size)
        view = memoryview(buf)
        got = 0
        while got < size:
            n = os.readv(fd, [view[got:]])
            if n == 0:
                break
            got += n
        del view
        return buf
    finally:
        os.close(fd)


class Keystore(abc.ABC):
    """Named secrets of the appliance plus its monotonic boot counter."""

    kind: ClassVar[str]

    def __init__(self, root: Path) -> None:
        self.root = root

    def __repr__(self) -> str:
        return f"<{type(self).__name__} root={str(self.root)!r}>"

    @abc.abstractmethod
    def config(self) -> dict[str, Any]:
        """What state.json records about this keystore (bound by the state MAC)."""

    @abc.abstractmethod
    def persist(self) -> None:
        """Write the keystore's own files into the (empty, new) state dir."""

    @abc.abstractmethod
    def store(self, name: str, data: bytes | bytearray) -> None:
        """Store secret *name* atomically (new; never overwrites)."""

    def exists(self, name: str) -> bool:
        """Whether secret *name* is stored (optional secrets, e.g. a key added later)."""
        return (self.root / self.files((name,))[0]).exists()

    def remove(self, name: str) -> None:
        """Delete secret *name* durably (no-op if absent): a share of a retired key epoch."""
        path = self.root / self.files((name,))[0]
        try:
            path.unlink()
        except FileNotFoundError:
            return
        dir_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    @abc.abstractmethod
    def load(self, name: str) -> bytearray:
        """Secret *name* in a fresh bytearray; the caller wipes it after use."""

    @abc.abstractmethod
    def files(self, names: tuple[str, ...]) -> list[str]:
        """The state-dir files (0600) holding *names* (first, in order) and the keystore's own."""

    @abc.abstractmethod
    def next_boot(self) -> int:
        """Advance the monotonic boot counter and return its new value (>= 1)."""

    def lock(self) -> None:  # noqa: B027 - a backend without a wrapping key has nothing to drop
        """Forget any wrapping key held in memory; a later load() unwraps it again."""

    def discard(self) -> None:  # noqa: B027 - most backends own nothing outside the state dir
        """Undo create() after a failed activation (e.g. free a TPM NV index)."""

    def close(self) -> None:  # noqa: B027 - most backends hold nothing between calls
        """Forget whatever key material the keystore holds in memory."""
