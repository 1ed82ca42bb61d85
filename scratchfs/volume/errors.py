"""Volume-layer exceptions, each carrying its CLI exit code (scratchfs/exitcodes.py, docs/volume.md).

Messages never contain key material: they name the image, the step that failed and what to do.
"""

from __future__ import annotations

from scratchfs.exitcodes import (
    EXIT_BAD_IMAGE,
    EXIT_BAD_KEY_INPUT,
    EXIT_ERASED,
    EXIT_IMAGE_ACCESS,
    EXIT_NO_DEVICE_MAPPER,
    EXIT_NOT_OPEN,
    EXIT_TOOL_FAILED,
    EXIT_USAGE,
    EXIT_VOLUME_BUSY,
    EXIT_VOLUME_INTERNAL,
    EXIT_WRONG_KEY,
)


class VolumeError(Exception):
    """Base class: a volume operation failed; ``exit_code`` is the CLI's exit status."""

    exit_code = EXIT_VOLUME_INTERNAL


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

    exit_code = EXIT_VOLUME_BUSY


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
