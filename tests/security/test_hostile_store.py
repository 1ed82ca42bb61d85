"""Blobs pinned to what the daemon created: a hostile backing store cannot make it write elsewhere.

An attacker with write access to the backing directory (not to the daemon) plants, at a blob's
name, a hard link to a file it wants destroyed, another inode, or a blob it chowned. The root
daemon must refuse every one with EIO and one integrity WARNING naming the file, and must never
read, write or truncate through the planted object; shredding only removes the name.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import shutil
import time
from pathlib import Path

from tests.mounting import Mounted
from tests.security.helpers import BS, LogWatch, read_errno, write_new_file

VICTIM_SIZE = 52_921  # the size issue 10 found truncated to 0


def _victim(where: Path) -> tuple[Path, str]:
    path = where / "victim"
    path.write_bytes(os.urandom(VICTIM_SIZE))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def _direct_write(path: Path, data: bytes) -> None:
    """One O_DIRECT write, so the daemon (not the page cache) answers write(2) itself."""
    buf = mmap.mmap(-1, len(data))
    buf.write(data)
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        os.pwrite(fd, buf, 0)
    finally:
        os.close(fd)
        buf.close()


def _every_access_fails(path: Path) -> None:
    assert read_errno(lambda: path.read_bytes()) == errno.EIO
    assert read_errno(lambda: _direct_write(path, b"w" * BS)) == errno.EIO
    assert read_errno(lambda: os.truncate(path, 1)) == errno.EIO
    assert read_errno(lambda: os.truncate(path, 0)) == errno.EIO


def _gone(path: Path) -> bool:
    """Wait (bounded) until the daemon removed *path*: the kernel's FORGET after unlink is asynchronous."""
    for _ in range(200):
        if not os.path.lexists(path):
            return True
        time.sleep(0.05)
    return False


def _reasons(watch: LogWatch, name: str) -> list[str]:
    return [
        line.split(" reason=", 1)[1]
        for line in watch.lines()
        if "event=integrity_failure" in line and f"path=/{name} " in line
    ]


def test_planted_hard_link_is_refused_and_its_target_untouched(attacked: Mounted, tmp_path: Path) -> None:
    victim, digest = _victim(tmp_path)
    path = attacked.mountpoint / "linked"
    blob = write_new_file(attacked, path, os.urandom(3 * BS))
    watch = LogWatch(attacked)
    os.unlink(blob)
    os.link(victim, blob)  # the blob's name now leads to the victim (2 links)
    _every_access_fails(path)
    reasons = _reasons(watch, "linked")
    assert reasons and all("links" in r or "inode changed" in r for r in reasons), reasons
    os.unlink(path)  # shredding removes the planted name only
    assert _gone(blob)
    assert victim.stat().st_nlink == 1
    assert hashlib.sha256(victim.read_bytes()).hexdigest() == digest, "the link's target was modified"


def test_victim_renamed_over_a_blob_is_refused(attacked: Mounted, tmp_path: Path) -> None:
    """One link only and owned by the daemon's user: the inode number alone gives it away."""
    victim, digest = _victim(tmp_path)
    keep = tmp_path / "victim-copy"
    os.link(victim, keep)  # to compare afterwards; then the victim itself goes in with one link
    path = attacked.mountpoint / "swapped"
    blob = write_new_file(attacked, path, os.urandom(2 * BS))
    watch = LogWatch(attacked)
    os.unlink(keep)
    shutil.copyfile(victim, keep)
    os.rename(victim, blob)
    assert blob.stat().st_nlink == 1
    _every_access_fails(path)
    assert all("inode changed" in r for r in _reasons(watch, "swapped")) and _reasons(watch, "swapped")
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == digest, "the planted file was modified"
    os.unlink(path)
    assert _gone(blob)
    assert hashlib.sha256(keep.read_bytes()).hexdigest() == digest


def test_same_bytes_in_a_new_inode_are_refused(attacked: Mounted) -> None:
    """`cp blob x; mv x blob`: identical bytes, but not the file the daemon made."""
    path = attacked.mountpoint / "recreated"
    blob = write_new_file(attacked, path, os.urandom(2 * BS))
    watch = LogWatch(attacked)
    copy = blob.with_name("copy-in-progress")
    shutil.copyfile(blob, copy)
    os.rename(copy, blob)
    _every_access_fails(path)
    assert _reasons(watch, "recreated") and all("inode changed" in r for r in _reasons(watch, "recreated"))


def test_blob_given_to_another_owner_is_refused(attacked: Mounted) -> None:
    path = attacked.mountpoint / "chowned"
    blob = write_new_file(attacked, path, os.urandom(2 * BS))
    watch = LogWatch(attacked)
    os.chown(blob, 65534, 65534)
    assert read_errno(lambda: path.read_bytes()) == errno.EIO
    assert any("owned by uid 65534" in r for r in _reasons(watch, "chowned"))
