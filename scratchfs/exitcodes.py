"""Every exit code of the ``scratchfs`` command (README.md "Exit codes", docs/volume.md).

Exit codes are an interface: scripts, the agent and the tests branch on them. A number keeps
its meaning forever; a new failure that needs a different action gets a new number. The
ranges: 0-9 ``mount``/``umount``/``verify``, 10-19 ``scratchfs volume``, 130 interrupted.
Codes 20-31 belong to ``scanner-agent`` (agent/exitcodes.py), which runs this program.
"""

from __future__ import annotations

from typing import Final

# --- every sub-command -----------------------------------------------------------------

# Success (for `verify`: every file authenticated).
EXIT_OK: Final = 0
# Bad arguments (argparse uses 2 as well), or backing directory == mountpoint.
EXIT_USAGE: Final = 2
# Ctrl-C: 128 + SIGINT, as a shell reports a process killed by SIGINT.
EXIT_INTERRUPTED: Final = 130

# --- mount, umount, verify -------------------------------------------------------------

# Internal error (a bug; rerun with --debug), permission denied, or an unmount that failed
# for a reason fusermount3 does not name.
EXIT_INTERNAL: Final = 1
# `verify`: some file could not be read, none failed authentication. It shares 1 with
# EXIT_INTERNAL (documented so since `verify` exists): both say "not proven clean, and not
# proven corrupt"; EXIT_CORRUPT is the one that says tampering or damage.
EXIT_UNREADABLE: Final = 1
# Backing directory unusable: missing, not a directory, or holding files that are not a
# scratchfs store (nothing is touched).
EXIT_BACKING: Final = 3
# Mountpoint unusable: missing, not a directory, not empty, already mounted, a stale mount.
EXIT_MOUNTPOINT: Final = 4
# FUSE unavailable: /dev/fuse or fusermount3 missing.
EXIT_NO_FUSE: Final = 5
# The daemon failed to start, or the kernel refused the mount.
EXIT_DAEMON: Final = 6
# `umount`/`verify`: the path is not a (scratchfs) mount.
EXIT_NOT_MOUNTED: Final = 7
# `verify`: blocks failed authentication (corrupted or tampered with).
EXIT_CORRUPT: Final = 8
# `umount`: the mountpoint is busy, or the daemon did not finish shredding in time.
EXIT_BUSY: Final = 9

# --- scratchfs volume (docs/volume.md; scratchfs/volume/errors.py maps each error class) --

# Wrong key: no keyslot opens with it; nothing was modified.
EXIT_WRONG_KEY: Final = 10
# Not a usable LUKS2 volume (both headers damaged, LUKS1, unsupported cipher, over the
# unlock caps, no ext4 inside...).
EXIT_BAD_IMAGE: Final = 11
# `--backend dmcrypt` without a working device-mapper.
EXIT_NO_DEVICE_MAPPER: Final = 12
# Busy: mountpoint already mounted, image open elsewhere, image exists at format, ext4 busy
# at close. (Not EXIT_BUSY's 9: every volume code lies in 10-19.)
EXIT_VOLUME_BUSY: Final = 13
# `close`: no volume opened by scratchfs on that mountpoint.
EXIT_NOT_OPEN: Final = 14
# A system tool or the volume's FUSE server failed (losetup, mount, mkfs.ext4, cryptsetup).
EXIT_TOOL_FAILED: Final = 15
# Key input: unreadable descriptor, empty, too long, not 32 bytes where required.
EXIT_BAD_KEY_INPUT: Final = 16
# The volume was erased (no keyslot left): its data is gone.
EXIT_ERASED: Final = 17
# A path is unusable: image or mountpoint missing, not a directory, permission.
EXIT_IMAGE_ACCESS: Final = 18
# Internal error in a volume command (a bug): rerun with --debug and report it.
EXIT_VOLUME_INTERNAL: Final = 19

# --- the volume's FUSE server (``python -m scratchfs.volume.server``, internal) -----------

# Every start-up failure of the server, also sent down its readiness pipe; the opener turns
# it into EXIT_TOOL_FAILED with the server's message, so users never see this one.
EXIT_VOLUME_SERVER: Final = 1
