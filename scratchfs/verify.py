"""`scratchfs verify`: read every stored byte of every file through a live mount.

The daemon authenticates every block it serves, so a block that fails is reported by the read
failing with EIO. What to read comes from the daemon itself: the virtual xattr
`user.scratchfs.check_ranges.<offset>` lists the byte ranges holding data it wrote or data the
backing store holds (SEEK_DATA on the blob), so holes are skipped (a 16 TiB sparse file with one
written block costs one read, not 2^32) while ciphertext planted in a hole is still read and
caught. Where the daemon does not answer (an older daemon, xattrs disabled), every byte is read.

Reads go in chunks of up to CHUNK bytes; a chunk that fails is re-read block by block (advice
RANDOM keeps readahead from reaching past the chunk) to list exactly the failing blocks.
Long runs print a progress line to stderr every PROGRESS_SECONDS.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from scratchfs.exitcodes import EXIT_CORRUPT, EXIT_OK, EXIT_UNREADABLE

CHUNK = 1 << 20
PROGRESS_SECONDS = 5.0
CHECK_RANGES = "user.scratchfs.check_ranges."


class Progress:
    """Counts what was read; prints one line to *out* at most every *every* seconds."""

    def __init__(self, out: TextIO | None, every: float = PROGRESS_SECONDS) -> None:
        self.out = out
        self.every = every
        self.files = 0
        self.bytes = 0
        self.skipped = 0
        self._last = time.monotonic()

    def tick(self, path: Path) -> None:
        now = time.monotonic()
        if self.out is not None and now - self._last >= self.every:
            self._last = now
            self.out.write(
                f"progress: {self.files} file(s), {self.bytes} bytes read, {self.skipped} bytes of holes "
                f"skipped; now {path}\n"
            )
            self.out.flush()


def _block_size(fd: int) -> int:
    try:
        return int(os.getxattr(fd, "user.scratchfs.block_size"))
    except (OSError, ValueError):
        return 4096


def check_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) byte ranges to read, end exclusive: the daemon's list, or the whole file."""
    offset = 0
    while True:
        try:
            text = os.getxattr(fd, f"{CHECK_RANGES}{offset}").decode()
        except OSError as e:
            if e.errno == errno.EIO:
                raise
            yield 0, size  # the daemon cannot say: read everything
            return
        following = None
        for part in text.split():
            if part.startswith("next="):
                following = int(part[5:])
                continue
            first, _, last = part.partition("-")
            yield int(first), int(last) + 1
        if following is None or following <= offset:
            return
        offset = following


def verify_file(path: Path, step: int = 0, progress: Progress | None = None) -> tuple[list[int], int]:
    """Offsets of the *step*-sized chunks (default: the file's block size) of *path* whose read
    failed with EIO, and the step used."""
    bad: list[int] = []
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        size = os.fstat(fd).st_size
        step = step or _block_size(fd)
        try:
            ranges = list(check_ranges(fd, size))
        except OSError:
            ranges = [(0, size)]  # the blob itself is refused: every read will say where
        covered = 0
        for start, end in ranges:
            start -= start % step
            covered += end - start
            offset = start
            while offset < end:
                length = min(CHUNK, end - offset)
                try:
                    # Through the page cache a read that meets a bad block returns what came
                    # before it (short); the next read, starting there, gets the EIO.
                    got = len(os.pread(fd, length, offset))
                except OSError as e:
                    if e.errno != errno.EIO:
                        raise
                    aligned = offset - offset % step
                    bad.extend(_bad_blocks(fd, aligned, offset + length, step))
                    got = length
                if got == 0:
                    break  # the file shrank while we read it
                offset += got
                if progress is not None:
                    progress.bytes += got
                    progress.tick(path)
        if progress is not None:
            progress.skipped += max(0, size - covered)
    finally:
        os.close(fd)
    return bad, step


def _bad_blocks(fd: int, start: int, end: int, step: int) -> list[int]:
    bad = []
    for offset in range(start, end, step):
        try:
            os.pread(fd, step, offset)
        except OSError as e:
            if e.errno != errno.EIO:
                raise
            bad.append(offset)
    return bad


def verify_tree(
    root: Path,
    out: TextIO,
    step: int = 0,
    progress_out: TextIO | None = None,
    progress_every: float = PROGRESS_SECONDS,
) -> int:
    """Verify every regular file below *root*; print a report; return the exit code."""
    files = corrupt = 0
    errors = 0
    progress = Progress(progress_out, progress_every)
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            try:
                if not stat.S_ISREG(os.lstat(path).st_mode):
                    continue
                files += 1
                progress.files = files
                bad, step_used = verify_file(path, step, progress)
            except OSError as e:
                errors += 1
                out.write(f"UNREADABLE {path}: {e.strerror}\n")
                continue
            if bad:
                corrupt += 1
                ranges = ", ".join(f"{o}-{o + step_used - 1}" for o in bad[:20])
                more = f" (+{len(bad) - 20} more)" if len(bad) > 20 else ""
                out.write(f"CORRUPT {path}: {len(bad)} bad range(s) at bytes {ranges}{more}\n")
    out.write(
        f"checked {files} file(s): {corrupt} corrupt, {errors} unreadable; "
        f"{progress.bytes} bytes read, {progress.skipped} bytes of holes skipped\n"
    )
    if corrupt:
        return EXIT_CORRUPT
    return EXIT_UNREADABLE if errors else EXIT_OK

