"""`scratchfs verify`: read every byte of every file through a live mount, block by block.

The daemon authenticates every block it serves, so a block that fails is reported by the read
failing with EIO; we read in block-size steps (advice RANDOM, so readahead cannot mix up which
block failed) and list every failing file and block range.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import TextIO

EXIT_CLEAN = 0
EXIT_CORRUPT = 8
EXIT_UNREADABLE = 1


def _block_size(path: Path) -> int:
    try:
        size = int(os.getxattr(path, "user.scratchfs.block_size"))
    except OSError:
        size = 4096
    return size


def verify_file(path: Path, step: int) -> list[int]:
    """Offsets of the step-sized chunks of *path* whose read failed with EIO."""
    bad: list[int] = []
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        size = os.fstat(fd).st_size
        offset = 0
        while offset < size:
            try:
                os.pread(fd, step, offset)
            except OSError as e:
                if e.errno != errno.EIO:
                    raise
                bad.append(offset)
            offset += step
    finally:
        os.close(fd)
    return bad


def verify_tree(root: Path, out: TextIO, step: int = 4096) -> int:
    """Verify every regular file below *root*; print a report; return the exit code."""
    files = corrupt = 0
    errors = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            try:
                if not stat.S_ISREG(os.lstat(path).st_mode):
                    continue
                files += 1
                bad = verify_file(path, step)
            except OSError as e:
                errors += 1
                out.write(f"UNREADABLE {path}: {e.strerror}\n")
                continue
            if bad:
                corrupt += 1
                ranges = ", ".join(f"{o}-{o + step - 1}" for o in bad[:20])
                more = f" (+{len(bad) - 20} more)" if len(bad) > 20 else ""
                out.write(f"CORRUPT {path}: {len(bad)} bad range(s) at bytes {ranges}{more}\n")
    out.write(f"checked {files} file(s): {corrupt} corrupt, {errors} unreadable\n")
    if corrupt:
        return EXIT_CORRUPT
    return EXIT_UNREADABLE if errors else EXIT_CLEAN
