"""Mount profiles: named sets of mount options, so that people and the agent mount alike.

`posix` (the default) is POSIX-complete: xattrs, write-through to the daemon, the page cache
dropped at every open, attributes cached for a second. `scratch` is what the agent mounts its
job directory with and what the README recommends for local use: it gives up extended
attributes (ENOSYS, remembered by the kernel), lets the kernel batch writes in its page cache
(errors of a cached write show at fsync/close, not at write(2)), keeps a file's pages across
opens, and lets the kernel cache names, "no such name" and attributes for a day
(SCRATCH_CACHE_SECONDS).

Why a long cache is safe here: nobody but this daemon changes the namespace (the blob store is
its alone, and inode numbers are never reused), and the daemon changes nothing unasked: every
change arrives as a request of the one kernel mount, and the kernel updates or drops what it
cached for that request itself: the entry of a created, removed or renamed name, the negative
entry a create replaces, the parent directory's attributes, nlink and ctime of an inode linked
or unlinked through another name (attributes belong to the inode, not to a name), the reply's
attributes after chmod/chown/truncate, size and times after writes, atime after a READ that
reached us. The one change the kernel did not re-ask for, set-id bits cleared by a direct-I/O
write (fuse_ops.ScratchOps._kill_suid), is now pushed to it (invalidate_inode). So the length
of the timeout decides only how long an unchanged name stays valid without a LOOKUP: a day
covers any scan job (the agent's upload and shred walk names its scan wrote minutes earlier).
One thing lags longer than with 1 s: under the writeback cache the kernel keeps a file's
st_blocks from before its dirty pages reached the daemon until the file is closed (measured:
1 MiB written and fsync'ed, st_blocks 0 until close; with 1 s, right after the second). Only
`du` of files still being written sees it; the agent reads no st_blocks.

The profile had 60 s once and lost it for a failure that was not the timeout's: the daemons
of tests/fs/test_concurrency.py outliving their unmount came from a mount namespace made while
the mounts were live (`ip netns exec` of the appliance test bed on the same machine), which
kept a copy of every mount and so the FUSE connections open; the 1 s mounts hung alike.
`scratchfs umount` now ends such copies (scratchfs/keyholder/fusectl.py). docs/bench.md has the
measurements.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["DEFAULT_PROFILE", "PROFILES", "SCRATCH_CACHE_SECONDS", "Profile", "effective_flags"]

# As virtiofsd's cache=always (the guest alone changes its tree): longer than any job's life.
SCRATCH_CACHE_SECONDS = 86_400.0


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
        attr_timeout=SCRATCH_CACHE_SECONDS,
        summary="fast scratch space (the agent's): no xattrs, writeback and keep cache, "
        "names and attributes cached a day",
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
