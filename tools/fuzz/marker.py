"""Fuzz the store marker parser: `parse_marker` on arbitrary and near-valid bytes.

Property: it returns the format version only for a marker whose first line is exactly the magic
and a supported version, and otherwise raises ValueError (never another exception), so a
directory that is not ours is never taken for a store (and never wiped).

    python -m tools.fuzz.marker --seconds 60 [--engine atheris]
"""

from __future__ import annotations

import sys

from hypothesis import strategies as st

from scratchfs.store import MARKER_MAGIC, MARKER_MAX_BYTES, MARKER_VERSION, marker_bytes, parse_marker
from tools.fuzz.runner import Harness, main


def _near_valid() -> st.SearchStrategy[bytes]:
    """Valid markers edited a little: the inputs most likely to slip through a sloppy parser."""
    valid = marker_bytes()

    def edit(args: tuple[int, int, bytes, bool]) -> bytes:
        pos, value, insert, drop = args
        data = bytearray(valid)
        pos %= len(data) + 1
        if drop and pos < len(data):
            del data[pos]
        elif insert:
            data[pos:pos] = insert
        elif pos < len(data):
            data[pos] = value
        return bytes(data)

    return st.tuples(st.integers(0, 64), st.integers(0, 255), st.binary(max_size=8), st.booleans()).map(edit)


CASES = st.one_of(
    st.binary(max_size=MARKER_MAX_BYTES + 40),
    _near_valid(),
    st.builds(lambda tail: marker_bytes() + tail, st.binary(max_size=MARKER_MAX_BYTES)),
    st.builds(
        lambda pre, digits, post: pre + MARKER_MAGIC + b" v" + digits + post,
        st.sampled_from([b"", b" ", b"\t", b"\n", b"\x00"]),
        st.text("0123456789\u0660\u00b2", max_size=12).map(lambda t: t.encode()),
        st.sampled_from([b"", b"\n", b"\r\n", b" extra\n", b"\x00"]),
    ),
)


def check(data: bytes) -> None:
    """parse_marker accepts only a real marker and fails with ValueError on anything else."""
    try:
        version = parse_marker(data)
    except ValueError:
        return
    assert version == MARKER_VERSION, f"accepted unsupported version {version}"
    assert len(data) <= MARKER_MAX_BYTES, "accepted an oversized marker"
    first = data.split(b"\n", 1)[0].strip()
    magic, _, tail = first.partition(b" ")
    assert magic == MARKER_MAGIC, "accepted a marker without the magic"
    assert tail[:1] == b"v" and tail[1:].isdigit() and int(tail[1:]) == MARKER_VERSION


HARNESS = Harness("marker", CASES, check)

if __name__ == "__main__":
    sys.exit(main(HARNESS))
