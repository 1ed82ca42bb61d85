"""The agent's exceptions, each carrying its exit code (declared in agent/exitcodes.py).

Every failure the CLI reports maps to exactly one exception class, and each class carries
its exit code, so `cli.py` prints one line and exits with the documented number.
"""

from __future__ import annotations

from typing import ClassVar

from agent.exitcodes import (
    EXIT_ACTIVATION,
    EXIT_ATTESTATION,
    EXIT_DEACTIVATED,
    EXIT_INTERNAL,
    EXIT_KEYSTORE,
    EXIT_PCR,
    EXIT_PLATFORM,
    EXIT_QUARANTINED,
    EXIT_SCRATCH,
    EXIT_STATE,
    EXIT_TAMPERED,
    EXIT_TIME,
    EXIT_VOLUME,
)


class AgentError(Exception):
    """Base class: a failure the CLI reports in one line with ``exit_code``."""

    exit_code: ClassVar[int] = EXIT_INTERNAL
    hint: ClassVar[str] = "run with --debug for details"

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if hint is not None:
            self.hint = hint  # type: ignore[misc]

    def one_line(self) -> str:
        """The ``<what is wrong>; <what to do>`` part of the CLI error line."""
        return f"{self.message}; {self.hint}"


class StateError(AgentError):
    """The state directory is missing, incomplete or insecure."""

    exit_code = EXIT_STATE
    hint = "activate the appliance with 'scanner-agent activate'"


class TamperedError(AgentError):
    """The state directory was modified after activation."""

    exit_code = EXIT_TAMPERED
    hint = "re-image the appliance: the state cannot be trusted"


class PlatformUnavailable(AgentError):
    """The platform could not be reached or refused the connection."""

    exit_code = EXIT_PLATFORM
    hint = "check the network path and the platform's certificate, then retry"


class ActivationError(AgentError):
    """Activation was refused."""

    exit_code = EXIT_ACTIVATION
    hint = "ask the platform operator for a fresh activation code"


class Deactivated(AgentError):
    """The platform deactivated this appliance."""

    exit_code = EXIT_DEACTIVATED
    hint = "the appliance was deactivated by its platform; re-image and re-activate it"


class VolumeFailure(AgentError):
    """The encrypted volume failed."""

    exit_code = EXIT_VOLUME
    hint = "check the volume image in the state dir and the kernel's loop/FUSE support"


class ScratchFailure(AgentError):
    """scratchfs failed to mount or died."""

    exit_code = EXIT_SCRATCH
    hint = "check /dev/fuse and the scratchfs log in the state dir's run directory"


class TimeSyncError(AgentError):
    """Clock synchronisation with the platform failed."""

    exit_code = EXIT_TIME
    hint = "check that the platform's time endpoint is reachable"


class KeystoreError(AgentError):
    """The keystore cannot hold or give back the appliance's secrets (TPM missing, refused)."""

    exit_code = EXIT_KEYSTORE
    hint = "check the TPM, or re-activate the appliance"


class PcrMismatchError(AgentError):
    """The TPM refuses to unseal because a bound PCR no longer has its activation value."""

    exit_code = EXIT_PCR
    hint = (
        "if the boot change (firmware, bootloader, Secure Boot keys) was intended, re-activate "
        "the appliance; otherwise investigate the boot chain"
    )


class Quarantined(AgentError):
    """The platform quarantined this appliance because it saw signs of a clone."""

    exit_code = EXIT_QUARANTINED
    hint = (
        "stop any copy of this appliance, then ask the platform operator to run "
        "'scanner-platform appliance clear NAME'"
    )


class AttestationRefused(AgentError):
    """The platform refused this appliance's TPM evidence (enrollment or a boot session)."""

    exit_code = EXIT_ATTESTATION
    hint = (
        "see the platform's events for this appliance; a TPM that cannot prove the keys "
        "(another TPM, a cleared one, a copied state dir) needs re-activation"
    )
