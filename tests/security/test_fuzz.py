"""Bounded runs of the fuzz harnesses in tools/fuzz, and proof that each harness can catch a bug."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from scratchfs import blocks, store
from scratchfs.content import FileContent
from tools.fuzz import block_decode, content_read, marker
from tools.fuzz.runner import Harness, run_for

SECONDS = 3.0


@pytest.mark.parametrize("harness", [block_decode.HARNESS, marker.HARNESS, content_read.HARNESS], ids=lambda h: h.name)
def test_harness_finds_nothing(harness: Harness) -> None:
    cases = run_for(harness, SECONDS)
    assert cases >= 50, f"{harness.name} ran only {cases} cases"


def test_block_decode_harness_catches_a_decoder_that_ignores_the_version(monkeypatch: pytest.MonkeyPatch) -> None:
    real = blocks.open_block

    def sloppy(key, blob_id, index, version, record, plain_len):  # type: ignore[no-untyped-def]
        # a decoder that trusts the nonce stored in the record: accepts replayed blocks
        stored = int.from_bytes(bytes(record[:12]), "big") & ((1 << 64) - 1)
        return real(key, blob_id, index, stored, record, plain_len)

    monkeypatch.setattr(blocks, "open_block", sloppy)
    with pytest.raises(AssertionError):
        run_for(block_decode.HARNESS, 30.0)


def test_marker_harness_catches_a_parser_that_accepts_any_magic(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(marker, "parse_marker", lambda data: store.MARKER_VERSION)
    with pytest.raises(AssertionError):
        run_for(marker.HARNESS, 30.0)


def test_content_harness_catches_a_read_that_skips_authentication(monkeypatch: pytest.MonkeyPatch) -> None:
    def unauthenticated_read(self: FileContent, offset: int, length: int) -> bytes:
        # serve raw blob bytes: what a filesystem without integrity checks would return
        if self.blob_id is None:
            return bytes(max(0, min(length, self.size - offset)))
        with open(self.store.root / self.blob_id.hex(), "rb") as f:
            f.seek(offset)
            return f.read(max(0, min(length, self.size - offset)))

    monkeypatch.setattr(FileContent, "read", unauthenticated_read)
    with pytest.raises(AssertionError):
        run_for(content_read.HARNESS, 30.0)


def test_command_line() -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "tools.fuzz.marker", "--seconds", "1"], capture_output=True, text=True, timeout=120
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("fuzz marker: engine=hypothesis cases=") and "failures=0" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "tools.fuzz.marker", "--seconds", "0"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr


def test_atheris_engine_runs_when_installed(tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    r = subprocess.run(
        [sys.executable, "-m", "tools.fuzz.block_decode", "--seconds", "2", "--engine", "atheris"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # libFuzzer writes crash-* files into the working directory
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Done" in r.stderr and "runs in" in r.stderr
