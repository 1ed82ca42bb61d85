"""Run-time state of open volumes: one directory per mountpoint under the run directory.

``<run_dir>/<id>/state.json`` records what ``close`` must undo (backend, loop device, FUSE
server pid and start time, device-mapper name). It holds no secret. ``<id>`` is derived from
the mountpoint's real path so that ``close MOUNTPOINT`` finds it; creating the directory is
the lock that stops two opens on the same mountpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_RUN_DIR = Path("/run/scratchfs/volume")


@dataclass
class VolumeState:
    """What an open volume consists of (all public information)."""

    backend: str
    image: str
    mountpoint: str
    loop_device: str | None = None
    fuse_dir: str | None = None
    server_pid: int | None = None
    server_start: int | None = None
    dm_name: str | None = None


def volume_id(mountpoint: Path) -> str:
    """Stable short id of a mountpoint (its real path hashed)."""
    real = os.path.realpath(mountpoint)
    return hashlib.sha256(real.encode()).hexdigest()[:16]


def state_dir(run_dir: Path, mountpoint: Path) -> Path:
    """The state directory of the volume mounted at *mountpoint*."""
    return run_dir / volume_id(mountpoint)


def save(directory: Path, state: VolumeState) -> None:
    """Write state.json atomically (write, fsync, rename)."""
    tmp = directory / "state.json.tmp"
    with open(tmp, "w") as f:
        json.dump(asdict(state), f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / "state.json")


def load(directory: Path) -> VolumeState | None:
    """Read state.json, or None if there is none (or it is unreadable)."""
    try:
        with open(directory / "state.json") as f:
            raw = json.load(f)
        return VolumeState(**raw)
    except (FileNotFoundError, json.JSONDecodeError, TypeError):
        return None


def all_states(run_dir: Path) -> list[tuple[Path, VolumeState]]:
    """Every recorded open volume."""
    found = []
    if run_dir.is_dir():
        for d in sorted(run_dir.iterdir()):
            st = load(d)
            if st is not None:
                found.append((d, st))
    return found


def remove(directory: Path) -> None:
    """Delete a state directory (its FUSE mountpoint must be unmounted already)."""
    shutil.rmtree(directory, ignore_errors=True)
