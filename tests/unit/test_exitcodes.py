"""Exit codes are an interface: each program declares them once (its exitcodes module) and
the documented tables list exactly those numbers. A code added, dropped or renumbered on one
side only fails here."""

from __future__ import annotations

import re
from pathlib import Path
from types import ModuleType

import pytest

from agent import exitcodes as agent_codes
from scratchfs import exitcodes as scratchfs_codes
from tools.platform import exitcodes as platform_codes
from tools.seal import exitcodes as seal_codes

ROOT = Path(__file__).resolve().parents[2]


def declared(module: ModuleType, prefix: str = "EXIT_") -> set[int]:
    return {v for k, v in vars(module).items() if k.startswith(prefix) and isinstance(v, int)}


def documented(doc: str, heading: str) -> set[int]:
    """The codes in the first table after *heading* (a "10-19" row, en dash in the docs, expands)."""
    text = (ROOT / doc).read_text()
    start = text.index(heading)
    codes: set[int] = set()
    in_table = False
    for line in text[start:].splitlines()[1:]:
        if not line.startswith("|"):
            if in_table:
                break
            continue
        in_table = True
        first = line.split("|")[1].strip()
        if m := re.fullmatch(r"(\d+)\s*[\u2013-]\s*(\d+)", first):
            codes |= set(range(int(m[1]), int(m[2]) + 1))
        elif first.isdigit():
            codes.add(int(first))
    return codes


@pytest.mark.parametrize(
    ("doc", "heading", "module"),
    [
        ("README.md", "### Exit codes", scratchfs_codes),  # volume codes as one 10-19 row
        ("docs/agent.md", "### Exit codes", agent_codes),
    ],
)
def test_documented_tables_list_the_declared_codes(doc: str, heading: str, module: ModuleType) -> None:
    assert documented(doc, heading) == declared(module)


def test_platform_table_is_the_platforms_codes_and_holds_the_seals() -> None:
    table = documented("docs/platform.md", "Exit codes (both tools")
    assert table == {v for k, v in vars(platform_codes).items() if k.isupper() and isinstance(v, int)}
    assert declared(seal_codes) <= table


def test_volume_table_is_the_volume_range() -> None:
    volume = {v for v in declared(scratchfs_codes) if 10 <= v <= 19}
    assert documented("docs/volume.md", "## Exit codes") == volume | {
        scratchfs_codes.EXIT_OK, scratchfs_codes.EXIT_USAGE
    }


def test_programs_do_not_share_numbers_beyond_the_conventional_ones() -> None:
    """0 and 2 (argparse) mean the same everywhere; scratchfs's 0-19/130 and the agent's
    20-32 stay apart, so a status in the agent's log names its program."""
    agent_own = declared(agent_codes) - {0, 2}
    assert agent_own == set(range(20, 33))
    assert not agent_own & declared(scratchfs_codes)
    assert declared(agent_codes, "SCAN_") == {0, 1, 2}
