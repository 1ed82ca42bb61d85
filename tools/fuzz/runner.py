"""Shared driver of the fuzz harnesses: hypothesis by default, atheris (libFuzzer) when asked.

A harness is a hypothesis strategy that draws one *case* and a *check* that raises
AssertionError when the code under test misbehaves on it. `run_for()` feeds freshly generated
cases for a bounded wall-clock time (the way CI runs it); `main()` is the command line shared by
every `python -m tools.fuzz.NAME --seconds N [--engine atheris]`.

Exit codes: 0 no failure found, 1 a failing case was found (printed, shrunk by hypothesis),
2 usage error, 3 the atheris engine was asked for but is not installed. Under atheris, libFuzzer
reports a finding itself (traceback, non-zero exit, crash-* file).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

log = logging.getLogger("tools.fuzz")

T = TypeVar("T")

EXIT_OK = 0
EXIT_FOUND = 1
EXIT_USAGE = 2
EXIT_NO_ENGINE = 3


@dataclass
class Harness:
    """One fuzz target: how to draw a case and how to judge the code under test on it."""

    name: str
    strategy: st.SearchStrategy[Any]
    check: Callable[[Any], None]


def build_test(harness: Harness, max_examples: int, counter: list[int]) -> Callable[[], None]:
    """A hypothesis test running *harness* for up to *max_examples* fresh cases per call."""

    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        derandomize=False,
        phases=[Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
    )
    @given(harness.strategy)
    def test(case: Any) -> None:
        counter[0] += 1
        harness.check(case)

    return test


def run_for(harness: Harness, seconds: float, batch: int = 50) -> int:
    """Run *harness* for about *seconds* (at least one batch); returns how many cases ran.

    A failing case propagates as the exception hypothesis raises after shrinking it.
    """
    counter = [0]
    test = build_test(harness, batch, counter)
    deadline = time.monotonic() + seconds
    while True:
        test()
        if time.monotonic() >= deadline:
            return counter[0]


def _instrument(atheris: Any) -> None:
    """Coverage-instrument scratchfs's own functions in place (instrument_all() takes minutes)."""
    import inspect

    for name, module in list(sys.modules.items()):
        if not name.startswith("scratchfs") or module is None:
            continue
        for _, obj in inspect.getmembers(module):
            targets = [obj] if inspect.isfunction(obj) else []
            if inspect.isclass(obj) and obj.__module__ == name:
                targets = [f for f in vars(obj).values() if inspect.isfunction(f)]
            for fn in targets:
                if fn.__module__ == name:
                    atheris.instrument_func(fn)


def _run_atheris(harness: Harness, seconds: float) -> int:
    try:
        import atheris
    except ImportError:
        print(f"fuzz {harness.name}: atheris is not installed; pip install atheris, or use --engine hypothesis")
        return EXIT_NO_ENGINE
    counter = [0]
    test: Any = build_test(harness, 1, counter)
    _instrument(atheris)
    atheris.Setup([sys.argv[0], f"-max_total_time={max(1, int(seconds))}"], test.hypothesis.fuzz_one_input)
    atheris.Fuzz()
    return EXIT_OK


def main(harness: Harness, argv: list[str] | None = None) -> int:
    """Command line of one harness; returns the exit code."""
    parser = argparse.ArgumentParser(prog=f"python -m tools.fuzz.{harness.name}", description=harness.check.__doc__)
    parser.add_argument("--seconds", type=float, default=10.0, help="wall-clock budget (default 10)")
    parser.add_argument("--engine", choices=["hypothesis", "atheris"], default="hypothesis")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return EXIT_USAGE if e.code else EXIT_OK
    if args.seconds <= 0:
        print(f"{parser.prog}: --seconds must be positive; give a time budget in seconds", file=sys.stderr)
        return EXIT_USAGE
    if args.engine == "atheris":
        return _run_atheris(harness, args.seconds)
    start = time.monotonic()
    try:
        cases = run_for(harness, args.seconds)
    except Exception as e:  # noqa: BLE001 - whatever escapes the property is a finding, reported in one line
        print(f"fuzz {harness.name}: FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FOUND
    elapsed = time.monotonic() - start
    print(f"fuzz {harness.name}: engine=hypothesis cases={cases} seconds={elapsed:.1f} failures=0")
    return EXIT_OK
