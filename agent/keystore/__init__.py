"""Where the appliance's secrets live: a keystore with a small, generic API.

    ks = create_keystore(root, "tpm", tcti="device:/dev/tpmrm0", pcrs=(7,))  # activation
    ks = open_keystore(root, config_from_state_json)                         # every boot
    ks.store("seal-key.bin", secret)      # any name, any size
    secret = ks.load("seal-key.bin")      # a bytearray: wipe it when done
    n = ks.next_boot()                     # monotonic boot counter (TPM NV where there is a TPM)

Two backends:

- ``tpm``: secrets are AES-256-GCM envelopes on disk under a 256-bit wrapping key that
  exists outside the process only as a TPM-sealed object (FIXEDTPM|FIXEDPARENT, under the
  owner hierarchy's storage primary key). Only the TPM that sealed it can unseal it, and,
  with ``pcrs``, only while those PCRs hold the values they had at activation. The boot
  counter is a TPM NV counter index. See `agent.keystore.tpm` for why an envelope rather
  than TPM-resident keys.
- ``file``: today's layout, the secrets in clear 0600 files. A copy of the disk is a copy
  of the appliance's identity; it exists for appliances without a TPM and for existing
  installations, is chosen only when asked for explicitly, and warns at every boot.

The backend and its parameters are recorded in ``state.json`` (``"keystore"``), which the
state binding covers, so switching backend by editing files fails the binding check.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Final

from agent.errors import KeystoreError, StateError
from agent.keystore.base import Keystore, check_name
from agent.keystore.file import FileKeystore

__all__ = [
    "DEFAULT_TPM_DEVICE",
    "KIND_FILE",
    "KIND_TPM",
    "Keystore",
    "check_name",
    "create_keystore",
    "default_tcti",
    "open_keystore",
]

KIND_FILE: Final = "file"
KIND_TPM: Final = "tpm"
DEFAULT_TPM_DEVICE: Final = Path("/dev/tpmrm0")


def default_tcti() -> str | None:
    """The TCTI of the kernel's TPM resource manager when there is one, else None."""
    return f"device:{DEFAULT_TPM_DEVICE}" if DEFAULT_TPM_DEVICE.exists() else None


def create_keystore(root: Path, kind: str, tcti: str | None = None, pcrs: tuple[int, ...] = ()) -> Keystore:
    """A new keystore for an activation into *root* (nothing is written until persist())."""
    if kind == KIND_FILE:
        if pcrs:
            raise KeystoreError("--tpm-pcrs needs the tpm keystore", "drop --tpm-pcrs or use --keystore tpm")
        return FileKeystore(root)
    if kind == KIND_TPM:
        if tcti is None:
            raise KeystoreError(
                f"no TPM found ({DEFAULT_TPM_DEVICE} is missing)",
                "pass --tcti for the TPM to use, or --keystore file to keep the keys in clear files",
            )
        from agent.keystore.tpm import TpmKeystore  # imported only where a TPM is used

        return TpmKeystore.create(root, tcti, pcrs)
    raise KeystoreError(f"unknown keystore {kind!r}", "use --keystore tpm or --keystore file")


def open_keystore(root: Path, config: Any, tcti_override: str | None = None) -> Keystore:
    """The keystore described by state.json's ``keystore`` value (None: a file keystore)."""
    if config is None:
        return FileKeystore(root)  # state dirs written before keystores existed
    if not isinstance(config, dict) or not isinstance(config.get("kind"), str):
        raise StateError("state.json has a malformed keystore entry", "re-activate the appliance")
    kind = config["kind"]
    if kind == KIND_FILE:
        return FileKeystore(root)
    if kind == KIND_TPM:
        from agent.keystore.tpm import TpmKeystore

        return TpmKeystore.open(root, config, tcti_override)
    raise StateError(f"state.json names an unknown keystore {kind!r}", "re-activate the appliance")


def quiet_tss_logging() -> None:
    """libtss2 logs every TPM error code to stderr itself; we report them in one line."""
    os.environ.setdefault("TSS2_LOG", "all+NONE")
