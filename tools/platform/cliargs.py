"""Argument types, the parser class and the subcommand builders of `scanner-platform`, and the
state directory a command's arguments name: every bad value is a one-line error saying what
was expected (exit code 2, `exitcodes.USAGE`). Shared by `cli` and `cli_identity`."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from protocol import api
from tools.platform import db, exitcodes, health, state

PROG = "scanner-platform"
STATE_ENV = "SCANNER_PLATFORM_STATE"
_N = TypeVar("_N", int, float)


class CliError(Exception):
    """A one-line error with its exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line like every other error of ours."""

    def error(self, message: str) -> NoReturn:
        # One line, like every other error of ours (argparse would print the usage too).
        self.exit(exitcodes.USAGE, f"{PROG}: {message}; see '{self.prog} --help'\n")


def name(value: str) -> str:
    """An appliance or credential name (protocol.api.NAME_RE)."""
    if not api.NAME_RE.match(value):
        raise argparse.ArgumentTypeError(f"invalid name {value!r} (1-63 chars: letters, digits, '.', '_', '-')")
    return value


def ranged(
    convert: Callable[[str], _N], lo: _N, hi: _N, what: str, *, above_lo: bool = False, shown: str | None = None
) -> Callable[[str], _N]:
    """An argparse type: *value* converted (int or float) and checked against [lo, hi]
    ((lo, hi] with *above_lo*); the one-line error says what was expected."""

    def parse(value: str) -> _N:
        try:
            n = convert(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not {what}") from None
        if not ((lo < n) if above_lo else (lo <= n)) or not n <= hi:
            bounds = shown or (f"above {lo} and at most {hi}" if above_lo else f"between {lo} and {hi}")
            raise argparse.ArgumentTypeError(f"{value!r} must be {bounds}")
        return n

    return parse


positive = ranged(float, 0.0, 1e9, "a number of seconds", above_lo=True, shown="a positive number of seconds")
count = ranged(int, 1, 1_000_000, "a whole number")
nbytes = ranged(int, 1, 1024**3, "a number of bytes", shown="between 1 byte and 1 GiB")
port = ranged(int, 1, 65535, "a port number")
interval = ranged(
    float,
    api.MIN_HEARTBEAT_INTERVAL,
    api.MAX_HEARTBEAT_INTERVAL,
    "a number of seconds",
    shown=(f"between {api.MIN_HEARTBEAT_INTERVAL:g} and {api.MAX_HEARTBEAT_INTERVAL:g} seconds"),
)
missing_after = ranged(int, 1, health.MAX_MISSING_AFTER, "a whole number of beats")
hook_timeout = ranged(
    float,
    0.0,
    health.MAX_HOOK_TIMEOUT,
    "a number of seconds",
    above_lo=True,
    shown=f"a positive number of seconds, at most {health.MAX_HOOK_TIMEOUT:g}",
)


def hook_argv(command: str) -> list[str]:
    """Split the hook command into argv (shell-like quoting, but it never runs in a shell)."""
    try:
        argv = shlex.split(command)
    except ValueError as e:
        raise CliError(f"cannot parse the alert hook command ({e}); check its quoting", exitcodes.USAGE) from None
    if not argv:
        raise CliError("the alert hook command is empty; give a program and its arguments", exitcodes.USAGE)
    program = argv[0]
    found = shutil.which(program) if "/" not in program else (program if os.access(program, os.X_OK) else None)
    if found is None:
        raise CliError(f"alert hook program {program!r} is not an executable file; give its path", exitcodes.USAGE)
    return argv


def listen(value: str) -> tuple[str, int]:
    """HOST:PORT to listen on (port 0: any free port)."""
    host, sep, port_s = value.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT")
    try:
        port = int(port_s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: port is not a number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r}: port outside 0-65535")
    return host.strip("[]"), port


def job_id(value: str) -> int:
    """A job id as `job list` shows it."""
    job_id = api.parse_job_id(value)
    if job_id is None:
        raise argparse.ArgumentTypeError(f"{value!r} is not a job id (see 'job list')")
    return job_id


def state_paths(args: argparse.Namespace) -> state.StatePaths:
    """The state directory of a command: STATE_DIR, else --state, else $SCANNER_PLATFORM_STATE."""
    root = args.state_dir if getattr(args, "state_dir", None) else (args.state or os.environ.get(STATE_ENV))
    if not root:
        raise CliError(f"no state directory; pass --state DIR or set {STATE_ENV}", exitcodes.USAGE)
    return state.StatePaths(Path(root))


def storage(args: argparse.Namespace) -> db.Storage:
    """The initialised platform's database, for ``with cliargs.storage(args) as storage:``."""
    paths = state_paths(args)
    state.check_initialised(paths)
    return state.open_storage(paths, pool_size=2)


Command = Callable[[argparse.Namespace], int]


def leaf(parent: Any, name: str, fn: Command, help_: str, state_flag: bool = True) -> argparse.ArgumentParser:
    """A subcommand running *fn*; with --state unless it takes STATE_DIR itself."""
    sp: argparse.ArgumentParser = parent.add_parser(name, help=help_, description=help_)
    sp.set_defaults(func=fn)
    if state_flag:
        sp.add_argument("--state", metavar="DIR", help=f"platform state directory (default: ${STATE_ENV})")
    return sp


def group(sub: Any, name: str, help_: str) -> Any:
    """A command with subcommands (``appliance add``, ``job list``, ...)."""
    return sub.add_parser(name, help=help_).add_subparsers(dest="subcommand", required=True, parser_class=Parser)
