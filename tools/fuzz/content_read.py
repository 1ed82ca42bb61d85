"""Fuzz the content engine's read path over a blob an attacker corrupts between operations.

No mount: a `BlobStore` over a temporary directory and one `FileContent`, driven by random
writes and truncates (checked against a bytes model), then the blob is corrupted on disk
(bit flips, cuts, extensions, zeroed or copied regions, replays of earlier snapshots of the
whole blob or of one region) and read and written again. Some cases pretend the backing
filesystem holds only a few records per file, so blocks past them live in the overflow blob, and
the attacks may hit that blob instead.

Property: every read returns exactly the model's bytes or raises IntegrityError (ValueError
tolerated); no other exception, never wrong data. A write that fails with IntegrityError
changes nothing; one that succeeds updates the model.

    python -m tools.fuzz.content_read --seconds 60 [--engine atheris]
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hypothesis import strategies as st

from scratchfs.blocks import OVERHEAD
from scratchfs.content import FileContent
from scratchfs.errors import IntegrityError
from scratchfs.store import BlobStore
from tools.fuzz.runner import Harness, main

BLOCK_SIZES = [512, 1024]


@dataclass
class Op:
    """write (offset, data) or truncate (size)."""

    kind: str
    offset: int
    data: bytes


@dataclass
class Attack:
    kind: str
    pos: int
    length: int
    value: int
    snapshot: int


@dataclass
class Case:
    block_size: int
    ident: int  # records the main blob may hold (0: what the real backing holds)
    attack_overflow: bool
    ops: list[Op]
    attacks: list[Attack]
    reads: list[tuple[int, int]]
    after: list[Op]


def _ops(max_size: int) -> st.SearchStrategy[list[Op]]:
    op = st.one_of(
        st.builds(
            Op, kind=st.just("write"), offset=st.integers(0, max_size), data=st.binary(min_size=1, max_size=1500)
        ),
        st.builds(Op, kind=st.just("truncate"), offset=st.integers(0, max_size + 1500), data=st.just(b"")),
    )
    return st.lists(op, min_size=1, max_size=8)


ATTACKS = st.lists(
    st.builds(
        Attack,
        kind=st.sampled_from(["flip", "cut", "extend", "zero", "copy", "replay_blob", "replay_region", "none"]),
        pos=st.integers(0, 1 << 14),
        length=st.integers(1, 1200),
        value=st.integers(1, 255),
        snapshot=st.integers(0, 7),
    ),
    max_size=3,
)

CASES = st.builds(
    Case,
    block_size=st.sampled_from(BLOCK_SIZES),
    ident=st.sampled_from([0, 2, 5]),
    attack_overflow=st.booleans(),
    ops=_ops(4000),
    attacks=ATTACKS,
    reads=st.lists(st.tuples(st.integers(0, 6000), st.integers(0, 3000)), min_size=1, max_size=6),
    after=_ops(4000),
)


class _Workspace:
    """One temporary store for the whole process, removed at exit."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="scratchfs-fuzz-"))
        self.store = BlobStore.open(self.root)
        self.real_limit = self.store.size_limit
        atexit.register(self.close)

    def close(self) -> None:
        self.store.close()
        shutil.rmtree(self.root, ignore_errors=True)


_WS: list[_Workspace] = []


def _workspace() -> _Workspace:
    if not _WS:
        _WS.append(_Workspace())
    return _WS[0]


def _apply(content: FileContent, model: bytearray, op: Op) -> None:
    if op.kind == "write":
        content.write(op.offset, op.data)
        if op.offset > len(model):
            model.extend(bytes(op.offset - len(model)))
        model[op.offset : op.offset + len(op.data)] = op.data
    else:
        content.truncate(op.offset)
        if op.offset < len(model):
            del model[op.offset :]
        else:
            model.extend(bytes(op.offset - len(model)))


def _attack(path: Path, attack: Attack, snapshots: list[bytes]) -> None:
    blob = bytearray(path.read_bytes())
    pos = attack.pos % (len(blob) + 1)
    if attack.kind == "flip" and blob:
        blob[pos % len(blob)] ^= attack.value
    elif attack.kind == "cut":
        del blob[pos:]
    elif attack.kind == "extend":
        blob += bytes([attack.value]) * attack.length
    elif attack.kind == "zero":
        blob[pos : pos + attack.length] = bytes(len(blob[pos : pos + attack.length]))
    elif attack.kind == "copy" and blob:
        src = (attack.pos * 7 + attack.value) % len(blob)
        chunk = bytes(blob[src : src + attack.length])
        blob[pos : pos + len(chunk)] = chunk
    elif attack.kind == "replay_blob":
        blob = bytearray(snapshots[attack.snapshot % len(snapshots)])
    elif attack.kind == "replay_region":
        old = snapshots[attack.snapshot % len(snapshots)]
        chunk = old[pos : pos + attack.length]
        blob[pos : pos + len(chunk)] = chunk
    # rewrite in place: the content engine keeps its fd on this inode
    with open(path, "r+b") as f:
        f.truncate(0)
        f.write(blob)


def _check_reads(content: FileContent, model: bytearray, reads: list[tuple[int, int]]) -> None:
    for offset, length in [*reads, (0, len(model))]:
        try:
            got = content.read(offset, length)
        except (IntegrityError, ValueError):
            continue
        assert got == bytes(model[offset : offset + length]), f"wrong data at offset {offset} length {length}"


def check(case: Case) -> None:
    """Reads over a corrupted blob return the model's bytes or fail; never other data."""
    ws = _workspace()
    record = case.block_size + OVERHEAD
    ws.store.size_limit = case.ident * record + 3 if case.ident else ws.real_limit
    content = FileContent(ws.store, case.block_size)
    model = bytearray()
    snapshots: list[bytes] = []

    def target() -> bytes | None:
        blob_id = content.ovf_id if case.attack_overflow else content.blob_id
        return blob_id

    try:
        for op in case.ops:
            _apply(content, model, op)
            blob_id = target()
            if blob_id is not None:
                snapshots.append((ws.root / blob_id.hex()).read_bytes())
        assert content.read(0, len(model) + 10) == bytes(model), "untampered content reads back wrong"
        blob_id = target()
        if blob_id is None:
            return
        blob_path = ws.root / blob_id.hex()
        for attack in case.attacks:
            _attack(blob_path, attack, snapshots)
        _check_reads(content, model, case.reads)
        for op in case.after:
            try:
                _apply(content, model, op)
            except IntegrityError:
                continue
            _check_reads(content, model, case.reads)
    finally:
        content.destroy()
    leftovers = [p for p in os.listdir(ws.root) if p != ".scratchfs"]
    assert leftovers == [], "destroy() left a blob behind"


HARNESS = Harness("content_read", CASES, check)

if __name__ == "__main__":
    sys.exit(main(HARNESS))
