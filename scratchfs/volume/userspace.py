"""The userspace backend: libcryptsetup for the volume master key, our FUSE server for the data path.

open:  unlock with libcryptsetup -> start the FUSE server (volume master key over a pipe) ->
       losetup the served ``data`` file -> mount ext4 from the loop device.
close: unmount ext4 -> detach the loop device -> unmount the FUSE mount -> the server exits
       (stopped by pid if it does not). Works too when the server was killed (the FUSE mount
       is then stale and answers ENOTCONN).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from scratchfs.keyholder import mountinfo, procs, ready
from scratchfs.volume import ext4, loop
from scratchfs.volume.errors import BadImageError, BusyError, ToolError
from scratchfs.volume.libcryptsetup import SegmentInfo
from scratchfs.volume.state import VolumeState, save
from scratchfs.volume.system import run, stop_process, umount
from scratchfs.volume.xts import UnsupportedCipherError, check_cipher

log = logging.getLogger(__name__)

SERVER_START_TIMEOUT = 30.0
# How long a closing volume waits for the kernel to release its loop device (see
# _umount_when_released).
RELEASE_TIMEOUT = 20.0


@dataclass
class Server:
    """A running FUSE server process and where it serves."""

    fuse_dir: Path
    pid: int
    start_time: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def data_path(self) -> Path:
        return self.fuse_dir / "data"


def segment_size(image: Path, seg: SegmentInfo) -> int:
    """Bytes of plaintext in the data segment (a 'dynamic' one runs to the end of the image)."""
    image_size = os.stat(image).st_size
    size = seg.size if seg.size is not None else image_size - seg.data_offset
    size -= size % seg.sector_size
    if size <= 0 or seg.data_offset + size > image_size:
        raise BadImageError(
            f"{image} is truncated ({image_size} bytes, the header needs "
            f"{seg.data_offset + max(size, seg.sector_size)}); restore the image from a backup"
        )
    return size


def iv_scheme(seg: SegmentInfo, image: Path) -> str:
    """Check that we can serve this segment; return its IV scheme."""
    try:
        return check_cipher(seg.cipher, seg.cipher_mode, seg.master_key_size, seg.sector_size)
    except UnsupportedCipherError as e:
        raise BadImageError(f"{image}: {e}; use --backend dmcrypt or reformat") from None


def start_server(
    image: Path,
    seg: SegmentInfo,
    master_key: bytearray,
    fuse_dir: Path,
    log_path: Path,
    debug: bool = False,
    die_with_parent: bool = False,
) -> Server:
    """Start the FUSE server serving *image*'s plaintext at *fuse_dir*/data; wait until live."""
    scheme = iv_scheme(seg, image)
    size = segment_size(image, seg)
    fuse_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_r, key_w = os.pipe()
    st_r, st_w = os.pipe()
    argv = [
        sys.executable,
        "-m",
        "scratchfs.volume.server",
        "--image",
        str(image),
        "--mountpoint",
        str(fuse_dir),
        "--key-fd",
        str(key_r),
        "--key-size",
        str(len(master_key)),
        "--status-fd",
        str(st_w),
        "--data-offset",
        str(seg.data_offset),
        "--size",
        str(size),
        "--sector-size",
        str(seg.sector_size),
        "--iv-offset",
        str(seg.iv_offset),
        "--iv-scheme",
        scheme,
        *(["--debug"] if debug else []),
        *(["--die-with-parent", "--parent-pid", str(os.getpid())] if die_with_parent else []),
    ]
    try:
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen(
                argv,
                pass_fds=(key_r, st_w),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,
            )
    except BaseException:
        for fd in (key_r, key_w, st_r, st_w):
            os.close(fd)
        raise
    os.close(key_r)
    os.close(st_w)
    try:
        # The volume master key is far smaller than PIPE_BUF: one write, never blocks.
        os.write(key_w, master_key)
    finally:
        os.close(key_w)
    start = procs.start_time(proc.pid) or 0
    server = Server(fuse_dir, proc.pid, start, proc)
    try:
        word = ready.read_word(st_r, SERVER_START_TIMEOUT)
    finally:
        os.close(st_r)
    if not word.ok:
        _kill(server)
        reason = word.message if word.code is not None else f"it {word.message}"
        raise ToolError(f"the volume's FUSE server did not start: {reason}; see {log_path}")
    log.info("event=server_started pid=%d fuse_dir=%s", proc.pid, fuse_dir)
    return server


def _kill(server: Server) -> None:
    if mountinfo.find(server.fuse_dir) is not None:
        run(["umount", "-l", str(server.fuse_dir)], what="unmounting the FUSE mount")
    stop_process(server.pid, server.start_time, grace=0.5)
    if server.process is not None:
        server.process.wait(timeout=10)


def stop_server(fuse_dir: Path, pid: int | None, start_time: int | None) -> None:
    """Unmount the FUSE mount (lazily if stale) and make sure the server process is gone."""
    if mountinfo.find(fuse_dir) is not None:
        try:
            _umount_when_released(fuse_dir)
        except ToolError:
            # A dead server leaves a mount answering ENOTCONN; a lazy unmount always works.
            umount(fuse_dir, what="unmounting the volume's FUSE mount", lazy=True)
    if pid is not None and start_time is not None:
        stop_process(pid, start_time)


def make_filesystem(image: Path, seg: SegmentInfo, master_key: bytearray, workdir: Path) -> None:
    """mkfs.ext4 on the served plaintext of a freshly formatted *image*.

    The server dies with us (PR_SET_PDEATHSIG): a killed format leaves no mount behind.
    """
    server = start_server(image, seg, master_key, workdir / "fuse", workdir / "server.log", die_with_parent=True)
    save(
        workdir,
        VolumeState(
            "userspace",
            str(image),
            "",
            fuse_dir=str(server.fuse_dir),
            server_pid=server.pid,
            server_start=server.start_time,
        ),
    )
    try:
        run(ext4.mkfs_command(server.data_path), what="creating ext4 in the volume", timeout=300)
    finally:
        stop_server(server.fuse_dir, server.pid, server.start_time)
        if server.process is not None:
            server.process.wait(timeout=10)


def open_volume(
    image: Path,
    mountpoint: Path,
    seg: SegmentInfo,
    master_key: bytearray,
    sdir: Path,
    debug: bool = False,
) -> tuple[VolumeState, Server]:
    """Serve, attach and mount; every step is undone if a later one fails."""
    fuse_dir = sdir / "fuse"
    with ExitStack() as undo:
        server = start_server(image, seg, master_key, fuse_dir, sdir / "server.log", debug)
        undo.callback(stop_server, fuse_dir, server.pid, server.start_time)
        st = VolumeState(
            "userspace",
            str(image),
            str(mountpoint),
            fuse_dir=str(fuse_dir),
            server_pid=server.pid,
            server_start=server.start_time,
        )
        save(sdir, st)
        device = loop.attach(server.data_path)
        undo.callback(loop.detach, device)
        st.loop_device = device
        save(sdir, st)
        ext4.require_filesystem(device, image)
        run(ext4.mount_command(device, mountpoint), what=f"mounting the volume on {mountpoint}")
        undo.pop_all()
    return st, server


def close_volume(state: VolumeState) -> None:
    """Unmount ext4, detach every loop device on the served file, stop the server."""
    mnt = Path(state.mountpoint)
    fuse_dir = Path(state.fuse_dir) if state.fuse_dir else None
    # Found by backing file, not by the recorded name: a device number may have been reused.
    devices = set(loop.devices_for(fuse_dir)) if fuse_dir else set()
    current = mountinfo.find(mnt) if state.mountpoint else None
    if current is not None and current.source in devices:
        umount(mnt, what=f"unmounting {mnt}")
    for device in sorted(devices):
        loop.detach(device)
    if fuse_dir is not None:
        stop_server(fuse_dir, state.server_pid, state.server_start)


def _umount_when_released(fuse_dir: Path) -> None:
    """Unmount the server's FUSE mount once no loop device holds the served file.

    `losetup --detach` of a device the kernel is still releasing (the ext4 unmount just
    before drops its last reference asynchronously) only marks it autoclear; until the
    release runs, the served file stays open and the unmount fails with "target is busy".
    On a loaded machine that window is long enough to hit, so wait it out, bounded."""
    deadline = time.monotonic() + RELEASE_TIMEOUT
    while True:
        if not loop.devices_for(fuse_dir):
            try:
                umount(fuse_dir, what="unmounting the volume's FUSE mount")
                return
            except BusyError:
                if time.monotonic() >= deadline:
                    raise
        elif time.monotonic() >= deadline:
            umount(fuse_dir, what="unmounting the volume's FUSE mount")  # says what holds it
            return
        time.sleep(0.05)
