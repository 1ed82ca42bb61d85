"""The one log line of every program: ``<UTC time> <LEVEL> <logger>: <message>``.

    2026-12-06T21:50:01.123Z WARNING scratchfs.fuse: event=integrity_failure path=/a ino=5 ...

- The time is ISO 8601 in UTC with milliseconds and a ``Z``: it sorts as text, and lines of
  an appliance, its scratchfs daemon and the platform compare without guessing a time zone.
  The agent passes its platform-synced clock offset, so its lines carry platform time.
- The message is ``event=... key=value`` (STYLE.md) and never holds a secret.
- Where someone else stamps the line (the scan child's parent re-logs every line it reads,
  syslog adds its own header), ``timestamps=False`` drops the time and keeps the rest.

It lives here because every program already imports ``scratchfs.keyholder`` (the agent,
the scratchfs daemon and volume server, the platform and scanner-seal through ``wipe``,
tools.bench through ``mountinfo``): one format without a new dependency for any of them.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

__all__ = ["LineFormatter", "setup"]

_LINE = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_BARE = "%(levelname)s %(name)s: %(message)s"


class LineFormatter(logging.Formatter):
    """The format above; *offset* returns seconds to add to the local clock (e.g. platform sync)."""

    def __init__(self, *, timestamps: bool = True, offset: Callable[[], float] | None = None) -> None:
        super().__init__(_LINE if timestamps else _BARE)
        self._offset = offset

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """UTC, ISO 8601, milliseconds, ``Z``."""
        t = record.created + (self._offset() if self._offset is not None else 0.0)
        whole = int(t)
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{int((t - whole) * 1000):03d}Z"


def setup(
    level: int,
    handler: logging.Handler | None = None,
    *,
    timestamps: bool = True,
    offset: Callable[[], float] | None = None,
) -> logging.Handler:
    """Send the root logger's records at *level* and above to *handler* (stderr by default)
    in the one format, replacing any handler set before; return the handler."""
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LineFormatter(timestamps=timestamps, offset=offset))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
