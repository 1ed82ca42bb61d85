"""The one log line format (scratchfs/keyholder/logformat.py)."""

from __future__ import annotations

import io
import logging
import re
import subprocess
from collections.abc import Iterator

import pytest

from scratchfs.keyholder import logformat

LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (INFO|WARNING) test\.logformat: event=(\w+) n=1$")


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def _emit(**kwargs: object) -> str:
    out = io.StringIO()
    logformat.setup(logging.INFO, logging.StreamHandler(out), **kwargs)  # type: ignore[arg-type]
    log = logging.getLogger("test.logformat")
    log.debug("event=hidden n=1")
    log.info("event=shown n=1")
    return out.getvalue()


def test_line_is_utc_iso_time_level_logger_message(restore_root: None) -> None:
    lines = _emit().splitlines()
    assert len(lines) == 1 and LINE.match(lines[0]), lines  # DEBUG filtered by the level
    assert len(logging.getLogger().handlers) == 1  # earlier handlers replaced, not stacked


def test_offset_shifts_the_time_and_bare_lines_have_none(restore_root: None) -> None:
    shifted = _emit(offset=lambda: 86400.0 * 365 * 10).strip()
    assert LINE.match(shifted) and int(shifted[:4]) >= 2030
    assert _emit(timestamps=False).strip() == "INFO test.logformat: event=shown n=1"


def test_every_program_shares_it() -> None:
    """A second format string anywhere in the code fails: the format has one owner."""
    out = subprocess.run(
        ["grep", "-rnE", r"basicConfig\(|logging\.Formatter\(|format=\"%\(", "agent", "scratchfs", "protocol",
         "tools"],
        capture_output=True, text=True, check=False, cwd=logformat.__file__.rsplit("/scratchfs/", 1)[0],
    )  # fmt: skip
    assert out.stdout == "", out.stdout
