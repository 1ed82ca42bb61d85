"""The one reader of /proc/self/mountinfo, and the one answer to "is this mount stale?".

The kernel escapes space, tab, newline and backslash in mountinfo paths as ``\\ooo`` (three
octal digits) and writes every other byte as is, so a path is decoded back to *bytes* first
and only then to str with the filesystem encoding: a non-ASCII mount point (UTF-8) round-trips,
which ``unicode_escape`` (Latin-1) did not. When mounts are stacked on one directory the last
line is the visible one, as for path lookup.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass

__all__ = ["STALE_ERRNOS", "MountEntry", "entries", "find", "is_stale", "parse", "under", "unescape"]

MOUNTINFO = "/proc/self/mountinfo"
# What the kernel answers on a FUSE mount whose server died: ECONNABORTED on the first access
# after the connection was aborted, ENOTCONN afterwards. Both mean "stale", never "busy".
STALE_ERRNOS = frozenset({errno.ENOTCONN, errno.ECONNABORTED})

_OCTAL = re.compile(rb"\\([0-7]{3})")


@dataclass(frozen=True)
class MountEntry:
    """One line of mountinfo, the fields we use."""

    mountpoint: str
    fstype: str
    source: str
    options: str
    # "major:minor" of the superblock: the same for every copy of one mount, in every
    # mount namespace (bind mounts and namespace copies share the superblock).
    device: str = ""


def unescape(field: str | bytes) -> str:
    """Decode a mountinfo path field (``\\040`` for space, ...) to the path it names."""
    raw = os.fsencode(field)
    return os.fsdecode(_OCTAL.sub(lambda m: bytes([int(m.group(1), 8)]), raw))


def parse(text: bytes) -> list[MountEntry]:
    """Every entry of a mountinfo text, in the kernel's order."""
    out = []
    for line in text.splitlines():
        fields = line.split(b" ")
        try:
            sep = fields.index(b"-", 6)  # optional fields end with a lone "-"
            if len(fields) < sep + 4:
                continue  # cut short: fstype, source and super options all follow the "-"
            out.append(
                MountEntry(
                    unescape(fields[4]),
                    os.fsdecode(fields[sep + 1]),
                    unescape(fields[sep + 2]),
                    os.fsdecode(fields[5]),
                    os.fsdecode(fields[2]),
                )
            )
        except (ValueError, IndexError):
            continue  # a line we cannot read names no mount we could act on
    return out


def entries() -> list[MountEntry]:
    """Every mount visible to this process."""
    # Binary: the kernel does not promise UTF-8, and text mode would fail on other bytes.
    with open(MOUNTINFO, "rb") as f:
        return parse(f.read())


def _target(path: str | os.PathLike[str]) -> str:
    # realpath is not strict: a stale mount point (stat fails) still resolves to itself.
    return os.path.realpath(path)


def find(path: str | os.PathLike[str]) -> MountEntry | None:
    """The visible mount exactly at *path* (last match wins for stacked mounts), or None."""
    target = _target(path)
    found = None
    for entry in entries():
        if entry.mountpoint == target:
            found = entry
    return found


def under(prefix: str | os.PathLike[str], include_self: bool = True) -> list[MountEntry]:
    """Every mount at (if *include_self*) or below *prefix*, deepest first (the unmount order)."""
    root = _target(prefix)
    below = root.rstrip("/") + "/"
    found = [e for e in entries() if (include_self and e.mountpoint == root) or e.mountpoint.startswith(below)]
    # Stable sort: for stacked mounts on one directory the later (upper) one stays first.
    return sorted(reversed(found), key=lambda e: -len(e.mountpoint))


def is_stale(path: str | os.PathLike[str]) -> bool:
    """True if *path* is a mount whose (FUSE) server is gone: statfs fails with ENOTCONN/ECONNABORTED.

    statfs, not stat: the kernel answers stat from cached attributes for up to the attribute
    timeout without asking the server, so a mount whose server was just killed still stats
    fine; statfs always goes to the server.
    """
    try:
        os.statvfs(path)
    except OSError as e:
        return e.errno in STALE_ERRNOS
    return False
