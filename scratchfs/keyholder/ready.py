"""The readiness pipe: how a key-holding child tells its starter that it serves, or why not.

Grammar (one line, at most once, then the writer closes its end)::

    ok\\n                    the mount is live
    err CODE MESSAGE\\n      it will not be: CODE is the exit code the child ends with,
                            MESSAGE one line for the user (never a key)

EOF before a full line means the child died first. One grammar for every child (the scratchfs
daemon, the userspace volume server) so that the starters (scratchfs CLI, volume layer, agent)
share one reader with one timeout.
"""

from __future__ import annotations

import os
import select
import time
from dataclasses import dataclass

import trio

__all__ = ["Word", "parse", "read_word", "read_word_async", "write_error", "write_ok"]

# One line and no more: a child cannot make its starter buffer without bound.
MAX_LINE = 4096


@dataclass(frozen=True)
class Word:
    """What the child said: ok, or an error with its exit code; *code* is None if it said nothing."""

    ok: bool
    code: int | None = None
    message: str = ""


def _write(fd: int, line: str) -> None:
    try:
        os.write(fd, line.replace("\n", " ").encode()[: MAX_LINE - 1] + b"\n")
    except OSError:
        pass  # the starter is gone (EPIPE): nobody is left to tell
    finally:
        os.close(fd)


def write_ok(fd: int) -> None:
    """Say "ok" on *fd* and close it."""
    _write(fd, "ok")


def write_error(fd: int, code: int, message: str) -> None:
    """Say "err CODE MESSAGE" on *fd* and close it."""
    _write(fd, f"err {code} {message}")


def parse(data: bytes) -> Word:
    """The Word in what was read (everything up to EOF or the first newline)."""
    if not data.endswith(b"\n"):
        return Word(False, None, "exited without a word" if not data else "said half a word")
    text = data.decode(errors="replace").strip()
    if text == "ok":
        return Word(True)
    parts = text.split(" ", 2)
    if len(parts) >= 2 and parts[0] == "err" and parts[1].isdigit():
        return Word(False, int(parts[1]), parts[2] if len(parts) == 3 else "no reason given")
    return Word(False, None, "said something that is not ok/err")


class _Line:
    """The bytes read so far, up to the first newline or MAX_LINE."""

    def __init__(self) -> None:
        self.data = b""

    @property
    def done(self) -> bool:
        return self.data.endswith(b"\n") or len(self.data) >= MAX_LINE

    def read(self, fd: int) -> bool:
        """Read what *fd* has; False once the writer is gone (EOF or error)."""
        try:
            chunk = os.read(fd, MAX_LINE - len(self.data))
        except OSError:
            return False
        self.data += chunk
        return bool(chunk)


def _late(timeout: float) -> Word:
    return Word(False, None, f"gave no word within {timeout:.0f}s")


def read_word(fd: int, timeout: float) -> Word:
    """Read the child's word from *fd* for at most *timeout* seconds (blocking; closes nothing)."""
    deadline = time.monotonic() + timeout
    line = _Line()
    while not line.done:
        # select: a child that hangs before answering must not hang its starter.
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            return _late(timeout)
        if not line.read(fd):
            break
    return parse(line.data)


async def read_word_async(fd: int, timeout: float) -> Word:
    """read_word for trio callers: waits without blocking the event loop."""
    line = _Line()
    with trio.move_on_after(timeout):
        while not line.done:
            await trio.lowlevel.wait_readable(fd)
            if not line.read(fd):
                break
        return parse(line.data)
    return _late(timeout)
