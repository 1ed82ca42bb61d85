"""Copies of a FUSE mount in other mount namespaces, and ending their connection.

Why this exists: a process that makes a private mount namespace (``unshare -m``, ``ip netns
exec``, a container runtime, systemd's ``PrivateTmp=``) while a scratchfs mount is live gets
its own copy of that mount. Unmounting the original then only detaches *our* copy; the
superblock, and with it the FUSE connection, lives on as long as any copy does. The daemon
never sees its connection close, so it never shreds, and the other namespace keeps reading
plaintext through it: after ``scratchfs umount`` said "done". Both are wrong for scratch
storage, so the unmount ends the connection itself, through the kernel's fusectl interface
(``/sys/fs/fuse/connections/N/abort``, N = the superblock's device number), exactly what the
kernel does when the last copy goes away.

Only copies in *other* mount namespaces count: another mount of the same superblock in the
caller's own namespace (a bind mount the user made) is theirs to unmount, and is reported.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from scratchfs.keyholder import mountinfo

__all__ = ["CONNECTIONS", "abort", "connection_number", "holders_elsewhere", "same_namespace_copies"]

CONNECTIONS = Path("/sys/fs/fuse/connections")


def connection_number(device: str) -> int:
    """fusectl's directory number for a mount whose mountinfo device is ``major:minor``."""
    major, minor = (int(part) for part in device.split(":"))
    return os.makedev(major, minor)


def _namespace(pid: int | str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/mnt").st_ino
    except OSError:
        return None  # gone, or not ours to look at


def holders_elsewhere(device: str) -> list[int]:
    """PIDs (one per mount namespace) outside our mount namespace that still see *device* mounted."""
    ours = _namespace("self")
    seen: set[int] = set()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        ns = _namespace(name)
        if ns is None or ns == ours or ns in seen:
            continue
        seen.add(ns)
        try:
            with open(f"/proc/{name}/mountinfo", "rb") as f:
                text = f.read()
        except OSError:
            continue
        if any(e.device == device and e.fstype.startswith("fuse") for e in mountinfo.parse(text)):
            found.append(int(name))
    return sorted(found)


def same_namespace_copies(device: str) -> list[str]:
    """Mount points in our own namespace that still show *device* (bind mounts of it)."""
    return [e.mountpoint for e in mountinfo.entries() if e.device == device]


@contextlib.contextmanager
def _connections_dir() -> Iterator[Path]:
    """The fusectl directory: the system's if mounted, else a private mount of it (root only).

    fusectl is a single superblock, so mounting it in a temp directory shows the same
    connections; it is unmounted again at once, leaving no mount behind.
    """
    if any(e.fstype == "fusectl" and e.mountpoint == str(CONNECTIONS) for e in mountinfo.entries()):
        yield CONNECTIONS
        return
    with tempfile.TemporaryDirectory(prefix="scratchfs-fusectl-") as tmp:
        done = subprocess.run(["mount", "-t", "fusectl", "fusectl", tmp], capture_output=True, check=False)
        if done.returncode != 0:
            raise OSError(f"cannot mount fusectl: {done.stderr.decode(errors='replace').strip() or 'failed'}")
        try:
            yield Path(tmp)
        finally:
            subprocess.run(["umount", tmp], capture_output=True, check=False)


def abort(device: str) -> bool:
    """Abort the FUSE connection of *device*; False if it is already gone.

    Raises OSError when the connection exists but cannot be aborted (fusectl not mounted and
    we are not root, or the connection belongs to another user).
    """
    number = connection_number(device)
    with _connections_dir() as connections:
        control = connections / str(number) / "abort"
        try:
            with open(control, "w") as f:
                f.write("1")
        except FileNotFoundError:
            return False
    return True
