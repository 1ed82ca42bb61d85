"""Volume-layer exceptions, each carrying the CLI exit code documented in docs/volume.md.

Messages never contain key material: they name the image, the step that failed and what to do.
"""

from __future__ import annotations

# Exit codes of `scratchfs volume ...` (2 is argparse's usage error, as everywhere).
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_WRONG_KEY = 10
EXIT_BAD_IMAGE = 11
EXIT_NO_DEVICE_MAPPER = 12
EXIT_BUSY = 13
EXIT_NOT_OPEN = 14
EXIT_TOOL_FAILED = 15
EXIT_BAD_KEY_INPUT = 16
EXIT_ERASED = 17
EXIT_IMAGE_ACCESS = 18
EXIT_INTERNAL = 19


class VolumeError(Exception):
    """Base class: a volume operation failed; ``exit_code`` is the CLI's exit status."""

    exit_code = EXIT_INTERNAL


class WrongKeyError(VolumeError):
    """No keyslot of the volume opens with the given key."""

    exit_code = EXIT_WRONG_KEY


class BadImageError(VolumeError):
    """Not a usable LUKS2 volume: corrupt, truncated, other format or unsupported parameters."""

    exit_code = EXIT_BAD_IMAGE


class DeviceMapperMissingError(VolumeError):
    """The dmcrypt backend was asked for on a machine without device-mapper."""

    exit_code = EXIT_NO_DEVICE_MAPPER


class BusyError(VolumeError):
    """The target is in use: mountpoint busy or already mounted, image already exists/open."""

    exit_code = EXIT_BUSY


class NotOpenError(VolumeError):
    """No volume opened by us is mounted at the given mountpoint."""

    exit_code = EXIT_NOT_OPEN


class ToolError(VolumeError):
    """A system tool (mkfs.ext4, losetup, mount, cryptsetup) or the FUSE server failed."""

    exit_code = EXIT_TOOL_FAILED


class KeyInputError(VolumeError):
    """The key could not be read from its file descriptor or has the wrong length."""

    exit_code = EXIT_BAD_KEY_INPUT


class ErasedError(VolumeError):
    """The volume has no keyslot left (it was erased): nothing can open it any more."""

    exit_code = EXIT_ERASED


class ImageAccessError(VolumeError):
    """A path given cannot be used: image or mountpoint missing, permissions, I/O error."""

    exit_code = EXIT_IMAGE_ACCESS


class UsageError(VolumeError):
    """A parameter is out of range (same exit code as argparse's usage errors)."""

    exit_code = EXIT_USAGE
