"""Mount profiles: named sets of mount options, so that people and the agent mount alike.

`posix` (the default) is POSIX-complete: xattrs, write-through to the daemon, the page cache
dropped at every open, attributes cached for a second. `scratch` is what the agent mounts its
job directory with and what the README recommends for local use: it gives up extended
attributes (ENOSYS, remembered by the kernel), lets the kernel batch writes in its page cache
(errors of a cached write show at fsync/close, not at write(2)), keeps a file's pages across
opens. Names and attributes stay cached for 1 s as in posix: 60 s removed every LOOKUP of
an expired name in the benchmarks (docs/bench.md, issue 23), but with it the daemons of
tests/fs/test_concurrency.py did not exit within 30 s of their unmount (1 s: they do); until
that is understood, `--attr-timeout 60` is an explicit choice, not the preset.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["DEFAULT_PROFILE", "PROFILES", "Profile", "effective_flags"]


@dataclass(frozen=True)
class Profile:
    """What a profile turns on; explicit command-line options add to it (and --attr-timeout wins)."""

    no_xattr: bool
    writeback: bool
    keep_cache: bool
    attr_timeout: float
    summary: str


PROFILES: dict[str, Profile] = {
    "posix": Profile(
        no_xattr=False,
        writeback=False,
        keep_cache=False,
        attr_timeout=1.0,
        summary="POSIX-complete (default): xattrs, errors at write(2), attributes cached 1 s",
    ),
    "scratch": Profile(
        no_xattr=True,
        writeback=True,
        keep_cache=True,
        attr_timeout=1.0,
        summary="fast scratch space (the agent's): no xattrs, writeback and keep cache",
    ),
}
DEFAULT_PROFILE = "posix"

_FLAGS = {"no_xattr": "--no-xattr", "writeback": "--writeback-cache", "keep_cache": "--keep-cache"}


def effective_flags(argv: Sequence[str]) -> set[str]:
    """The on/off mount flags (--no-xattr, --writeback-cache, --keep-cache) that a `scratchfs
    mount` argument list turns on, its --profile included (for harnesses that adapt to a mount)."""
    flags = {a for a in argv if a in _FLAGS.values()}
    name = DEFAULT_PROFILE
    for i, arg in enumerate(argv):
        if arg == "--profile" and i + 1 < len(argv):
            name = argv[i + 1]
        elif arg.startswith("--profile="):
            name = arg.partition("=")[2]
    profile = PROFILES.get(name)
    if profile is not None:
        flags |= {flag for field, flag in _FLAGS.items() if getattr(profile, field)}
    return flags
