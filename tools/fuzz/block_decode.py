"""Fuzz the block decoder: `open_block` / `open_block_into` on mutated records and wrong parameters.

Property: decoding either raises IntegrityError (or ValueError) or returns exactly the plaintext
that was sealed, and it may only succeed when record, key, blob id, index, version and length are
all the ones used to seal. A failed `open_block_into` leaves no unauthenticated plaintext in the
output buffer.

    python -m tools.fuzz.block_decode --seconds 60 [--engine atheris]
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from hypothesis import strategies as st

from scratchfs import blocks
from scratchfs.crypto import FileKey
from scratchfs.errors import IntegrityError
from tools.fuzz.runner import Harness, main

# One key per process: drawing keys per case would only measure the CSPRNG.
_KEY = FileKey.new()
_OTHER_KEY = FileKey.new()
_FILL = 0xA5


@dataclass
class Mutation:
    """One edit of the record: kind, position, operand."""

    kind: str
    pos: int
    value: int
    data: bytes


@dataclass
class Case:
    plain: bytes
    blob_id: bytes
    index: int
    version: int
    mutations: list[Mutation]
    read_blob_id: bytes | None
    read_index: int | None
    read_version: int | None
    read_len_delta: int
    other_key: bool
    splice_from: int | None


mutations = st.builds(
    Mutation,
    kind=st.sampled_from(["flip", "set", "insert", "delete", "truncate", "append", "zero", "nonce"]),
    pos=st.integers(0, 1 << 16),
    value=st.integers(0, 255),
    data=st.binary(max_size=40),
)

CASES = st.builds(
    Case,
    plain=st.binary(max_size=1200),
    blob_id=st.binary(min_size=16, max_size=16),
    index=st.integers(0, (1 << 64) - 1),
    version=st.integers(1, (1 << 64) - 1),
    mutations=st.lists(mutations, max_size=4),
    read_blob_id=st.none() | st.binary(min_size=16, max_size=16),
    read_index=st.none() | st.integers(0, (1 << 64) - 1),
    read_version=st.none() | st.integers(1, (1 << 64) - 1),
    read_len_delta=st.sampled_from([0, 0, 0, -1, 1, -16, 16]),
    other_key=st.booleans(),
    splice_from=st.none() | st.integers(0, 3),
)


def _mutate(record: bytes, muts: list[Mutation]) -> bytes:
    out = bytearray(record)
    for m in muts:
        pos = m.pos % (len(out) + 1)
        if m.kind == "flip" and out:
            out[pos % len(out)] ^= 1 << (m.value % 8)
        elif m.kind == "set" and out:
            out[pos % len(out)] = m.value
        elif m.kind == "insert":
            out[pos:pos] = m.data or bytes([m.value])
        elif m.kind == "delete":
            del out[pos : pos + 1 + m.value % 32]
        elif m.kind == "truncate":
            del out[pos:]
        elif m.kind == "append":
            out += m.data or bytes([m.value])
        elif m.kind == "zero":
            out[pos : pos + 1 + m.value] = bytes(len(out[pos : pos + 1 + m.value]))
        elif m.kind == "nonce":
            # a once-valid nonce for a neighbouring version: what a replayed block carries
            out[:12] = (m.pos + m.value).to_bytes(12, "big")
    return bytes(out)


def check(case: Case) -> None:
    """open_block never returns data it was not given under exactly these parameters."""
    record = blocks.seal_record(_KEY, case.blob_id, case.index, case.version, case.plain)
    if case.splice_from is not None:
        # a valid record of a neighbouring block of the same file (moved or copied block)
        record = blocks.seal_record(_KEY, case.blob_id, case.splice_from, case.version, case.plain)
    mutated = _mutate(record, case.mutations)
    blob_id = case.blob_id if case.read_blob_id is None else case.read_blob_id
    index = case.index if case.read_index is None else case.read_index
    version = case.version if case.read_version is None else case.read_version
    plain_len = max(0, len(case.plain) + case.read_len_delta)
    key = _OTHER_KEY if case.other_key else _KEY
    # AES-GCM is deterministic for a given key, nonce and associated data, so the only record that
    # may decode under the read parameters is the one sealing this plaintext under exactly them.
    identical = (
        not case.other_key
        and plain_len == len(case.plain)
        and mutated == blocks.seal_record(_KEY, blob_id, index, version, case.plain)
    )
    try:
        got = blocks.open_block(key, blob_id, index, version, mutated, plain_len)
    except (IntegrityError, ValueError):
        got = None
    if got is not None:
        assert identical, "open_block accepted a record that differs from what was sealed"
        assert got == case.plain, "open_block returned wrong plaintext"
    else:
        assert not identical, "open_block refused an untouched record"

    out = bytearray([_FILL]) * plain_len
    try:
        blocks.open_block_into(key, blob_id, index, version, memoryview(mutated), memoryview(out))
    except (IntegrityError, ValueError):
        assert set(out) <= {0} or set(out) == {_FILL}, "a failed open_block_into left plaintext in the buffer"
        assert not identical, "open_block_into refused an untouched record"
        return
    assert identical, "open_block_into accepted a record that differs from what was sealed"
    assert bytes(out) == case.plain, "open_block_into wrote wrong plaintext"


HARNESS = Harness("block_decode", CASES, check)

if __name__ == "__main__":
    sys.exit(main(HARNESS))
