"""The keyslot passphrase for this boot, from the platform's share and the appliance's own.

One owner for the volume-key protocol on the appliance (see agent/volumekey.py for why two
shares): fetch the platform's part, combine it with the appliance share held by the
keystore, move the LUKS2 keyslot to a pending epoch when the platform offers one, and tell
the platform once the old epoch no longer opens anything.

The move (an older appliance's migration from a platform-held passphrase, or a rotation the
operator asked for) is crash-safe at every step, because each step leaves a state the next
boot recognises and finishes:

1. the appliance share of the new epoch is created and stored (a boot that finds it stored
   reuses it; the platform keeps the pending share until commit);
2. `scratchfs.volume.api.rotate_passphrase` adds the new keyslot, then destroys the old
   one; it resumes from "both open" or "only the new one opens";
3. the platform is told (commit); it then destroys the old share with its proof;
4. appliance shares of older epochs are removed from the keystore (at every boot).

Nothing here logs or raises a share or a passphrase.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from agent import faults
from agent.errors import PlatformUnavailable, VolumeFailure
from agent.keystore.base import Keystore
from agent.volumekey import SHARE_SIZE, derive_keyslot_passphrase
from protocol import api
from protocol.client import PlatformClient, PlatformError, SealedShare
from protocol.sealing import SealError
from scratchfs.keyholder.wipe import wipe
from scratchfs.volume import api as volume_api
from scratchfs.volume.errors import VolumeError, WrongKeyError

log = logging.getLogger("agent.unlock")

_SHARE_NAME = re.compile(r"^volume-share-([0-9]{1,10})$")

Unseal = Callable[[bytes, bytes], bytearray]
Format = Callable[[bytearray], Awaitable[None]]


def share_name(epoch: int) -> str:
    """The keystore name of the appliance share of *epoch*."""
    return f"volume-share-{epoch}"


def appliance_share_names(keystore: Keystore) -> list[str]:
    """The names of the appliance shares *keystore* holds, oldest epoch first (a keystore
    migration moves them all)."""
    epochs = set()
    for path in keystore.root.iterdir():
        m = _SHARE_NAME.match(path.name.split(".", 1)[0])
        if m is not None and keystore.exists(m.group(0)):
            epochs.add(int(m.group(1)))
    return [share_name(e) for e in sorted(epochs)]


def is_clear_share_file(name: str) -> bool:
    """Whether *name* is an appliance share as the file keystore keeps it (in clear)."""
    return _SHARE_NAME.match(name) is not None


def _random_share() -> bytearray:
    return bytearray(os.urandom(SHARE_SIZE))


class Unlocker:
    """Works out the passphrase for this boot; `passphrase()` does steps 1-4."""

    def __init__(self, client: PlatformClient, keystore: Keystore, unseal: Unseal, appliance: str,
                 image: Path, format_volume: Format) -> None:
        self.client = client
        self.keystore = keystore
        self.unseal = unseal
        self.appliance = appliance
        self.image = image
        self.format_volume = format_volume

    async def passphrase(self) -> bytearray:
        """The keyslot passphrase that opens the volume now (formatting it on first boot);
        the caller wipes it. Platform failures propagate as PlatformError."""
        offer = await self.client.volume_key()
        pending = offer.pending
        if pending is None and offer.scheme == api.KEY_SCHEME_PASSPHRASE:
            pending = await self._begin_migration()
        current = self._key_of(offer.current, create=False) if self._volume_exists() else None
        if pending is None:
            if current is None:  # first boot of an appliance whose platform is not split-aware
                current = self._key_of(offer.current, create=True)
                await self.format_volume(current)
            self._forget_older_shares(offer.current.epoch)
            return current
        target = self._key_of(pending, create=True)
        faults.crash_point("unlock:share_stored")
        try:
            if current is None:
                log.info("event=first_boot_split_key epoch=%d", pending.epoch)
                await self.format_volume(target)
            else:
                outcome = await trio.to_thread.run_sync(
                    volume_api.rotate_passphrase, self.image, current, target
                )
                log.info("event=keyslot_rotated epoch=%d outcome=%s", pending.epoch, outcome)
        except WrongKeyError:
            wipe(target)
            raise VolumeFailure(
                f"volume {self.image}: neither key epoch {offer.current.epoch} nor {pending.epoch} opens it",
                "the appliance share or the platform share does not match this disk; re-image and re-activate",
            ) from None
        except VolumeError as e:
            wipe(target)
            raise VolumeFailure(f"volume {self.image}: {e}") from None
        finally:
            if current is not None:
                wipe(current)
        faults.crash_point("unlock:rotated")
        try:
            proven = await self.client.volume_key_commit(pending.epoch)
        except BaseException:
            wipe(target)
            raise
        log.info("event=volume_key_committed epoch=%d old_destroyed_proven=%s", pending.epoch, proven)
        faults.crash_point("unlock:committed")
        self._forget_older_shares(pending.epoch)
        return target

    def _volume_exists(self) -> bool:
        return self.image.exists()

    async def _begin_migration(self) -> SealedShare | None:
        """Ask for the first platform share; None from a platform that has no split keys."""
        try:
            share = await self.client.volume_key_next()
        except PlatformError as e:
            if e.status == 404 and e.reason == api.REASON_NOT_FOUND:
                log.warning("event=split_key_unsupported action=keep_platform_passphrase")
                return None
            raise
        log.info("event=split_key_migration epoch=%d", share.epoch)
        return share

    def _key_of(self, part: SealedShare, *, create: bool) -> bytearray:
        """The passphrase of *part*: the legacy passphrase itself (epoch 0), or the HKDF of
        the platform share and the appliance share of that epoch."""
        context = api.SEAL_CONTEXT_VOLUME_KEY if part.epoch == 0 else api.SEAL_CONTEXT_VOLUME_SHARE
        try:
            opened = self.unseal(part.sealed, context)
        except SealError as e:
            raise PlatformUnavailable(f"the volume key does not unseal ({e})") from None
        if part.epoch == 0:
            return opened
        try:
            appliance_share = self._appliance_share(part.epoch, create=create)
            try:
                return derive_keyslot_passphrase(opened, appliance_share, self.appliance, part.epoch)
            finally:
                wipe(appliance_share)
        finally:
            wipe(opened)

    def _appliance_share(self, epoch: int, *, create: bool) -> bytearray:
        name = share_name(epoch)
        if self.keystore.exists(name):
            return self.keystore.load(name)
        if not create:
            raise VolumeFailure(
                f"the appliance share of volume key epoch {epoch} is missing from the keystore",
                "the volume cannot be opened without it; re-image and re-activate the appliance",
            )
        share = _random_share()
        self.keystore.store(name, share)  # TPM-wrapped with the tpm keystore, never in clear
        log.info("event=appliance_share_created epoch=%d", epoch)
        return share

    def _forget_older_shares(self, epoch: int) -> None:
        """Remove appliance shares of epochs before *epoch*: they open nothing any more."""
        for name in appliance_share_names(self.keystore):
            old = int(name.rsplit("-", 1)[1])
            if old < epoch:
                self.keystore.remove(name)
                log.info("event=appliance_share_removed epoch=%d", old)
