"""Per-operation FUSE request counters kept by the daemon itself.

The kernel keeps no per-operation counts for a FUSE connection, and request counts are what
the performance work is judged by (they are deterministic where wall-clock time on a shared
machine is not). Every handler bumps its counter; the counts are

- logged once at unmount (`event=request_counts total=N lookup=... write=...`), and
- written as JSON to `--stats-file` at unmount and whenever the daemon receives SIGUSR1, so
  that a benchmark can take a snapshot before and after each workload.

Counts only: no names, offsets or sizes, so the file says nothing about what was stored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["OPERATIONS", "RequestStats"]

# Every operation ScratchOps serves (pyfuse3's handler names). Pre-filled so that the hot path
# is one dict increment with no membership test, and so that a zero shows up in the output.
OPERATIONS = (
    "lookup", "forget", "getattr", "setattr", "readlink", "mknod", "mkdir", "symlink", "link",
    "unlink", "rmdir", "rename", "open", "create", "read", "write", "flush", "release", "fsync", "fallocate",
    "opendir", "readdir", "releasedir", "fsyncdir", "statfs", "setxattr", "getxattr", "listxattr",
    "removexattr", "access",
)  # fmt: skip


class RequestStats:
    """Request counts by operation, and where to dump them."""

    __slots__ = ("counts", "dumps", "path")

    def __init__(self, path: Path | None = None) -> None:
        self.counts: dict[str, int] = dict.fromkeys(OPERATIONS, 0)
        self.path = path
        self.dumps = 0  # lets a reader tell a fresh dump from the previous one

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def log_fields(self) -> str:
        """`total=N op=count ...` for the non-zero operations, for one log line."""
        nonzero = " ".join(f"{op}={n}" for op, n in self.counts.items() if n)
        return f"total={self.total} {nonzero}".rstrip()

    def dump(self) -> None:
        """Write the counts to the stats file, atomically (a reader never sees half a file)."""
        if self.path is None:
            return
        self.dumps += 1
        doc = {"dumps": self.dumps, "pid": os.getpid(), "total": self.total, "requests": self.counts}
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(doc, sort_keys=True) + "\n")
        os.replace(tmp, self.path)
