"""The volume-key endpoints' work: the caller's part of its volume key sealed to it, the
pending share of a migration or rotation, and the commit that destroys the part it replaces.

`handlers.PlatformApp` routes the requests here (thin methods the route table names). Key
wrapping is `keys`, sealing `protocol.sealing`, records `db`. Every plaintext part is wiped
once sealed; only sealed bytes leave this module.
"""

from __future__ import annotations

import base64
import functools
import logging
import time
from typing import TYPE_CHECKING, Any

from protocol import api, sealing
from scratchfs.keyholder.wipe import wipe
from tools.platform import db, keys
from tools.platform.http import HttpError

if TYPE_CHECKING:
    from tools.platform.handlers import Database

log = logging.getLogger("scanner-platform")


class VolumeKeyEndpoints:
    """Hand-out, next share and commit of an appliance's volume key for `handlers.PlatformApp`."""

    def __init__(self, database: Database, kek: bytes) -> None:
        self.db = database
        self._kek = kek

    def __repr__(self) -> str:
        return "VolumeKeyEndpoints()"

    def _sealed_part(self, app: db.Appliance, wrapped: bytes, epoch: int) -> str:
        """A wrapped volume-key part unwrapped and sealed to the appliance (v2 hybrid HPKE once
        it told us its hybrid key, else v1): the keyslot passphrase (epoch 0) or a share."""
        assert app.x25519_public is not None  # the caller checked
        context = api.SEAL_CONTEXT_VOLUME_KEY if epoch == 0 else api.SEAL_CONTEXT_VOLUME_SHARE
        if epoch == 0:
            part = keys.unwrap(self._kek, wrapped, app.id, app.name)
        else:
            part = keys.unwrap_share(self._kek, wrapped, app.id, app.name, epoch)
        try:
            sealed = sealing.seal_for(app.x25519_public, app.hybrid_public, part, context)
        finally:
            wipe(part)
        return base64.b64encode(sealed).decode()

    async def current(self, app: db.Appliance) -> dict[str, Any]:
        """GET PATH_VOLUME_KEY: the caller's own part of its volume key, sealed to it: the
        keyslot passphrase itself (scheme "passphrase") or the platform's share of the
        current epoch (scheme "split"), and the pending share of a migration or rotation."""
        record = await self.db.run(self.db.storage.volume_key_record, app.id)
        if record is None or app.x25519_public is None:
            raise HttpError(503, api.REASON_UNAVAILABLE, "no volume key on record")
        pending = None
        if record.pending_epoch is not None and record.wrapped_pending is not None:
            pending = {
                api.F_EPOCH: record.pending_epoch,
                api.F_SEALED: self._sealed_part(app, record.wrapped_pending, record.pending_epoch),
            }
        doc = {
            api.F_KEY_SCHEME: record.scheme,
            api.F_EPOCH: record.epoch,
            api.F_SEALED: self._sealed_part(app, record.wrapped, record.epoch),
            api.F_NEXT: pending,
        }
        await self.db.run(self.db.storage.log_event, time.time(), "volume_key", app.id)
        log.info("event=volume_key_handed_out appliance=%s scheme=%s epoch=%d pending=%s",
                 app.name, record.scheme, record.epoch, record.pending_epoch)  # fmt: skip
        return doc

    async def next_share(self, app: db.Appliance) -> dict[str, Any]:
        """POST PATH_VOLUME_KEY_NEXT: the pending platform share, created on the first call
        (an appliance's migration to split keys); repeating it returns the same share."""
        if app.x25519_public is None:
            raise HttpError(503, api.REASON_UNAVAILABLE, "no volume key on record")
        wrap_new = functools.partial(keys.wrap_new_share, self._kek)
        try:
            epoch, wrapped = await self.db.run(self.db.storage.next_share, app.id, time.time(), wrap_new)
        except (db.NotFound, db.Conflict) as e:
            raise HttpError(503, api.REASON_UNAVAILABLE, str(e)) from None
        log.info("event=volume_key_next appliance=%s epoch=%d", app.name, epoch)
        return {api.F_EPOCH: epoch, api.F_SEALED: self._sealed_part(app, wrapped, epoch)}

    async def commit(self, app: db.Appliance, doc: dict[str, Any]) -> dict[str, Any]:
        """POST PATH_VOLUME_KEY_COMMIT {epoch}: the keyslot opens with that epoch only; the
        pending share becomes current and the part it replaces is destroyed and proven gone."""
        epoch = doc.get(api.F_EPOCH)
        if not isinstance(epoch, int) or isinstance(epoch, bool) or not 1 <= epoch <= db.MAX_EPOCH:
            raise HttpError(400, api.REASON_BAD_REQUEST, f"field {api.F_EPOCH!r} must be an integer in 1..2^32-1")
        try:
            proven = await self.db.run(self.db.storage.commit_share, app.id, epoch, time.time())
        except db.Conflict as e:
            raise HttpError(409, api.REASON_EPOCH_MISMATCH, str(e)) from None
        except db.NotFound as e:
            raise HttpError(503, api.REASON_UNAVAILABLE, str(e)) from None
        if proven:
            log.info("event=volume_key_committed appliance=%s epoch=%d shred_proven=true", app.name, epoch)
        else:
            log.warning("event=volume_key_committed appliance=%s epoch=%d shred_proven=false", app.name, epoch)
        return {api.F_EPOCH: epoch, api.F_SHRED_PROVEN: proven}
