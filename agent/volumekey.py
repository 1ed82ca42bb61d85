"""The keyslot passphrase from two shares: the platform's and the appliance's. Pure.

Neither share alone opens the volume: the LUKS2 keyslot passphrase is

    HKDF-SHA256(ikm = platform_share || appliance_share, salt = None,
                info = "scratchfs keyslot passphrase v1" | 0x00 | appliance id | 0x00 | epoch)

The platform share is created and kept (wrapped under its KEK) by the platform and reaches
the appliance sealed to its boot session; the appliance share is created on the appliance at
activation (or at the migration of an older appliance) and lives only in its keystore
(TPM-sealed where there is a TPM). So the platform's whole state plus a copy of the disk
lacks the appliance share, and a copied disk plus its TPM lacks the platform share, which
deactivation destroys.

Why a plain two-share HKDF and not a blinded exchange (Clevis/Tang's McCallum-Relyea): a
blinded exchange hides from the server even the value it helps to recover, which matters
when the server is an untrusted network service. Here the platform is the appliance's own
escrow: it must be able to delete its share (deactivation) and to prove that, and it gains
nothing from its share alone. McCallum-Relyea also needs elliptic-curve point addition,
which the `cryptography` package does not expose, and we write no group arithmetic of our
own. The epoch and the appliance id in the info keep two rotations, or two appliances, from
ever deriving the same passphrase from reused shares.
"""

from __future__ import annotations

from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["SHARE_SIZE", "ShareError", "derive_keyslot_passphrase"]

SHARE_SIZE: Final = 32  # each share is 256 random bits
_INFO: Final = b"scratchfs keyslot passphrase v1"
PASSPHRASE_SIZE: Final = 32  # what scratchfs.volume expects of a keyslot passphrase


class ShareError(ValueError):
    """A share of the wrong size or an epoch out of range (never says a byte of a share)."""


def derive_keyslot_passphrase(
    platform_share: bytes | bytearray,
    appliance_share: bytes | bytearray,
    appliance_id: str,
    epoch: int,
) -> bytearray:
    """The 32-byte keyslot passphrase for *epoch* of *appliance_id*'s volume.

    Returned as a bytearray so that the caller can wipe it once the volume is unlocked."""
    if len(platform_share) != SHARE_SIZE or len(appliance_share) != SHARE_SIZE:
        raise ShareError(f"each share must be {SHARE_SIZE} bytes")
    if not 1 <= epoch < 2**32:
        raise ShareError(f"key epoch {epoch} is out of range 1..2^32-1")
    info = b"\0".join((_INFO, appliance_id.encode(), str(epoch).encode()))
    ikm = bytearray(platform_share) + bytearray(appliance_share)
    try:
        return bytearray(HKDF(hashes.SHA256(), PASSPHRASE_SIZE, salt=None, info=info).derive(bytes(ikm)))
    finally:
        ikm[:] = bytes(len(ikm))
