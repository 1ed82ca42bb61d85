"""Helpers for the filesystem suite: syscalls Python lacks and running code as another user."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
AT_SYMLINK_NOFOLLOW = 0x100

NOBODY = 65534

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def renameat2(old: Path | str, new: Path | str, flags: int) -> None:
    """rename(2) with flags (RENAME_NOREPLACE, RENAME_EXCHANGE); raises OSError on failure."""
    rc = _libc.renameat2(
        AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), ctypes.c_uint(flags)
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(old), None, str(new))


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def utimensat(path: Path | str, atime: tuple[int, int], mtime: tuple[int, int],
              follow: bool = True) -> None:
    """utimensat(2) with (sec, nsec) pairs; nsec may be UTIME_NOW or UTIME_OMIT."""
    times = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    flags = 0 if follow else AT_SYMLINK_NOFOLLOW
    if _libc.utimensat(AT_FDCWD, os.fsencode(path), times, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))


def errname(fn: Callable[[], object]) -> str:
    """Call fn; return 'ok' or the errno name of the OSError it raised."""
    try:
        fn()
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e.errno))
    return "ok"


# Code run in the child before the caller's snippet. Everything the snippet needs is imported
# while still root: the interpreter lives below /root, which uid 65534 cannot read.
_PRELUDE = """
import errno, json, os, sys
def attempt(fn, *a, **kw):
    try:
        r = fn(*a, **kw)
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    if isinstance(r, int) and fn is os.open:
        os.close(r)
    return r if isinstance(r, (bool, str, list)) else "ok"
os.chdir(sys.argv[1])
os.setgroups([])
os.setresgid({gid}, {gid}, {gid})
os.setresuid({uid}, {uid}, {uid})
assert os.geteuid() == {uid} and os.getegid() == {gid}
R = {{}}
"""


def run_as(cwd: Path, code: str, uid: int = NOBODY, gid: int = NOBODY) -> dict[str, Any]:
    """Run *code* in a child that chdirs to *cwd* as root, then drops to uid/gid for good.

    The snippet sees `attempt(fn, *args)` (returns 'ok', a return value, or an errno name)
    and stores its results in the dict `R`, which is returned here. Paths in the snippet are
    relative to *cwd*, so directories above it (pytest's 0700 temp dirs) need no access.
    """
    script = _PRELUDE.format(uid=uid, gid=gid) + code + "\nprint(json.dumps(R))\n"
    proc = subprocess.run(
        [sys.executable, "-I", "-c", script, str(cwd)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(f"child as uid {uid} failed: {proc.stderr.strip()}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def write_all(fd: int, data: bytes, offset: int) -> None:
    """pwrite until everything is written."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        assert n > 0
        view = view[n:]
        offset += n


def read_all(fd: int, size: int, offset: int) -> bytes:
    """pread until *size* bytes or end of file."""
    parts = []
    while size > 0:
        chunk = os.pread(fd, size, offset)
        if not chunk:
            break
        parts.append(chunk)
        size -= len(chunk)
        offset += len(chunk)
    return b"".join(parts)


def errno_name(fn: object, *args: object) -> str:
    """The errno name *fn(*args)* fails with ("EFBIG", "EIO", ...), or "ok"."""
    try:
        fn(*args)  # type: ignore[operator]
    except OSError as e:
        return errno.errorcode[e.errno or 0]
    return "ok"
