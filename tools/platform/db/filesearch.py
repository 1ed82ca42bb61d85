"""Search the SQLite database files for byte strings (the shredding proof), in bounded memory.

A long-lived process that has the database open (the server) must never open and close
the database files itself: POSIX advisory locks belong to the process, and closing any
descriptor of a file drops every lock the process's SQLite connection holds on it. Another
process then believes it is the last user, deletes the WAL under the server's feet, and the
two stop seeing each other's writes. So the server runs the search in a child process
(`files_holding_isolated`); a CLI process, which closes its connection right after, may
search directly (`files_holding`).

``python -m tools.platform.db.filesearch DB_PATH`` reads hex needles, one per line, on
stdin (never argv: a wrapped value is ciphertext, but it stays out of process listings)
and prints the names of the files holding any of them, one per line.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

_TIMEOUT = 60.0  # seconds; a proof that takes longer is reported unproven


def files_holding(db_path: Path, needles: list[bytes]) -> list[str]:
    """Names of the SQLite files (main, -wal, -journal) that contain any of *needles*.

    Read in 1 MiB chunks overlapping by the longest needle, so a database of any size is
    searched in bounded memory and a needle across a chunk boundary is still found.
    """
    overlap = max(len(n) for n in needles) - 1
    found = []
    for suffix in ("", "-wal", "-journal"):
        p = Path(str(db_path) + suffix)
        try:
            f = p.open("rb")
        except FileNotFoundError:
            continue
        with f:
            tail = b""
            while chunk := f.read(1024 * 1024):
                window = tail + chunk
                if any(n in window for n in needles):
                    found.append(p.name)
                    break
                tail = window[-overlap:] if overlap else b""
    return found


def files_holding_isolated(db_path: Path, needles: list[bytes]) -> list[str] | None:
    """`files_holding` run in a child process (safe while this process has the database
    open); None if the child failed, which the caller treats as unproven."""
    try:
        proc = subprocess.run(
            [sys.executable, "-m", __name__, str(db_path)],
            input="".join(n.hex() + "\n" for n in needles).encode(),
            capture_output=True,
            timeout=_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    return proc.stdout.decode().split()


def main() -> int:
    """Child-process entry point (see the module docstring)."""
    needles = [bytes.fromhex(line) for line in sys.stdin.read().split()]
    if not needles:
        return 0
    for name in files_holding(Path(sys.argv[1]), needles):
        print(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
