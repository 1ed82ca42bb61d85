"""Fixtures for volume tests: real images, real FUSE servers, loop devices, ext4 mounts.

Every volume opened through ``vols`` is closed at teardown, and teardown fails if any loop
device, mount or FUSE server started by the test is left behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from scratchfs.keyholder import mountinfo, procs
from scratchfs.volume import api, loop
from scratchfs.volume import state as statemod
from scratchfs.volume.errors import NotOpenError

MiB = 1024 * 1024
DEV_MAPPER = Path("/dev/mapper")


@pytest.fixture(scope="session", autouse=True)
def _dev_mapper_left_as_found() -> Iterator[None]:
    """cryptsetup's libdevmapper creates /dev/mapper/control even without kernel support.

    Put /dev/mapper back the way the session found it (only a dead node is ever removed).
    """
    existed = DEV_MAPPER.exists()
    yield
    control = DEV_MAPPER / "control"
    if existed or not control.exists():
        return
    try:
        os.close(os.open(control, os.O_RDWR))
    except OSError:
        control.unlink(missing_ok=True)
        if not any(DEV_MAPPER.iterdir()):
            DEV_MAPPER.rmdir()


def loop_devices_under(prefix: Path) -> list[str]:
    """Loop devices whose backing file lies below *prefix*."""
    found = []
    for name in sorted(os.listdir("/sys/block")):
        if name.startswith("loop"):
            backing = loop.backing_file(name)
            if backing and backing.startswith(str(prefix)):
                found.append(f"/dev/{name}: {backing}")
    return found


def mounts_under(prefix: Path) -> list[str]:
    return [e.mountpoint for e in mountinfo.under(prefix)]


class Volumes:
    """Creates keys, images and open volumes inside one test's temp dir."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.run_dir = root / "run"
        self.opened: list[Path] = []
        self.servers: list[tuple[int, int]] = []

    def key(self) -> bytes:
        return os.urandom(32)

    def path(self, name: str) -> Path:
        return self.root / name

    def mountpoint(self, name: str) -> Path:
        p = self.root / name
        p.mkdir(exist_ok=True)
        return p

    def format(self, name: str, key: bytes, size: int = 32 * MiB, sector_size: int = 4096) -> Path:
        image = self.root / name
        api.format_volume(image, size, key, backend="userspace", sector_size=sector_size,
                          run_dir=self.run_dir)
        return image

    def open(self, image: Path, name: str, key: bytes) -> api.OpenVolume:
        mnt = self.mountpoint(name)
        vol = api.open_volume(image, mnt, key, "userspace", run_dir=self.run_dir)
        self.track(mnt)
        return vol

    def track(self, mountpoint: Path) -> None:
        """Remember a mountpoint opened by other means (e.g. the CLI) for teardown."""
        self.opened.append(Path(os.path.realpath(mountpoint)))
        st = statemod.load(statemod.state_dir(self.run_dir, mountpoint))
        if st and st.server_pid and st.server_start:
            self.servers.append((st.server_pid, st.server_start))

    def close_all(self) -> list[str]:
        problems = []
        for mnt in reversed(self.opened):
            try:
                api.close_volume(mnt, run_dir=self.run_dir)
            except NotOpenError:
                pass
            except Exception as e:  # noqa: BLE001 - collect every teardown problem
                problems.append(f"closing {mnt}: {e}")
        return problems


@pytest.fixture
def vols(tmp_path: Path) -> Iterator[Volumes]:
    """Volume factory; teardown closes everything and checks nothing is left behind."""
    v = Volumes(tmp_path)
    yield v
    problems = v.close_all()
    # Anything still attached or mounted is a leak of the code under test: clean, then fail.
    for dev in loop_devices_under(tmp_path):
        problems.append(f"loop device left behind: {dev}")
        subprocess.run(["losetup", "-d", dev.split(":")[0]], check=False)
    for mnt in sorted(mounts_under(tmp_path), reverse=True):
        problems.append(f"mount left behind: {mnt}")
        subprocess.run(["umount", "-l", mnt], check=False)
    for pid, start in v.servers:
        if procs.alive(pid, start):
            problems.append(f"FUSE server {pid} still running")
            os.kill(pid, 9)
    if v.run_dir.exists():
        left = [p.name for p in v.run_dir.iterdir()]
        if left:
            problems.append(f"state directories left behind: {left}")
    assert not problems, problems


def cryptsetup(*args: str, key: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    """Run cryptsetup (batch mode); a key goes through stdin (--key-file=-)."""
    argv = ["cryptsetup", "--batch-mode", *args]
    if key is not None:
        argv.insert(2, "--key-file=-")
    r = subprocess.run(argv, input=key, capture_output=True, timeout=120, check=False)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.decode()}")
    return r


requires_cryptsetup = pytest.mark.skipif(
    shutil.which("cryptsetup") is None, reason="cryptsetup (Debian cryptsetup-bin) is not installed"
)
