"""The ``file`` keystore: each secret in a clear 0600 file named after it.

This is the layout of every state dir written before keystores existed (``client-key.pem``,
``seal-key.bin``), so existing appliances keep booting. Anyone who reads the state dir
(a disk snapshot, a stolen VM image, a backup) holds the appliance's identity; the
platform's clone detection (boot counter + sessions) is then the only line of defence.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

from agent.errors import StateError
from agent.keystore.base import BOOT_COUNTER_FILE, Keystore, check_name, read_into, store_atomically, write_new


class FileKeystore(Keystore):
    """Secrets in clear files; boot counter in ``boot-counter``."""

    kind: ClassVar[str] = "file"

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def persist(self) -> None:
        """Nothing of its own to write."""

    def store(self, name: str, data: bytes | bytearray) -> None:
        store_atomically(self.root / check_name(name), data)

    def load(self, name: str) -> bytearray:
        path = self.root / check_name(name)
        try:
            return read_into(path)
        except FileNotFoundError:
            raise StateError(f"{path} is missing", "restore it or re-activate the appliance") from None

    def files(self, names: tuple[str, ...]) -> list[str]:
        return [check_name(n) for n in names]

    def next_boot(self) -> int:
        """Read, increment and durably replace the counter file.

        A file counter only orders boots of one disk: two copies of the disk count on
        independently, which the platform sees as a counter going back (or sessions
        interleaving) and quarantines.
        """
        path = self.root / BOOT_COUNTER_FILE
        try:
            current = int(path.read_text().strip() or "0")
        except FileNotFoundError:
            current = 0
        except ValueError:
            raise StateError(f"{path} is not a number", f"delete {path} (the platform will notice)") from None
        tmp = path.with_name(path.name + ".tmp")
        tmp.unlink(missing_ok=True)
        write_new(tmp, f"{current + 1}\n".encode())
        os.replace(tmp, path)
        dir_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return current + 1
