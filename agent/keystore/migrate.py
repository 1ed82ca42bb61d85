"""File keystore -> TPM, without re-imaging (``scanner-agent migrate-keystore``).

The appliance stays the same appliance (name, sealing keys, volume); what changes is where
its secrets live and its TLS key, which is new and TPM-wrapped, with a fresh certificate
(the platform revokes the old one at renewal).

Crash safety: the staged state dir (``STATE_DIR/.migrate``) is written completely and
verified before anything in the live one changes; then its files replace the old ones,
binding.mac last, and the clear key files are overwritten and removed. A staged dir that
holds binding.mac is complete: if a crash interrupted the swap, running the command again
finishes it (the old certificate is already revoked, so starting over is not an option).

Nothing in the keystore package imports this module: it sits on top of the state and the
platform client, as the CLI does, and the CLI only parses, hardens and prints.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import trio

from agent import keystore as ksmod
from agent import state as statemod
from agent import timesync
from agent.errors import KeystoreError, StateError
from agent.keystore.base import BOOT_COUNTER_FILE
from agent.keystore.file import FileKeystore
from agent.keystore.tpm import TpmKeystore, parse_pcrs
from agent.lifecycle import platform_client_for, platform_error
from agent.unlock import appliance_share_names, is_clear_share_file
from protocol.client import PlatformError, new_client_key_and_csr
from scratchfs.keyholder import mountinfo
from scratchfs.keyholder.wipe import wipe

MIGRATE_DIR: Final = ".migrate"


@dataclass(frozen=True)
class Migrated:
    """What ``migrate_to_tpm`` did, for the CLI's one line."""

    appliance: str
    tcti: str | None
    resumed: bool  # True: an interrupted swap was finished; nothing was renewed now


def migrate_to_tpm(root: Path, tcti: str | None, pcrs_text: str | None) -> Migrated:
    """Move the file-keystore appliance at *root* into the TPM (or finish a crashed move).

    *pcrs_text* is ``--tpm-pcrs`` as given, parsed only once there is something to migrate
    (so a state error is reported before a PCR list error, as the CLI always did).

    Raises AgentError subclasses: KeystoreError (already on the TPM, TPM refuses), StateError
    (volume mounted: the agent runs), platform errors from the renewal.
    """
    staging = root / MIGRATE_DIR
    if (staging / statemod.BINDING).exists():
        commit(root, staging)
        resumed = statemod.load_state(root, tcti)
        resumed.forget()
        return Migrated(resumed.appliance, tcti, resumed=True)
    state = statemod.load_state(root)
    try:
        if state.keystore.kind != ksmod.KIND_FILE:
            raise KeystoreError(
                f"appliance {state.appliance} already uses the {state.keystore.kind} keystore",
                "nothing to migrate",
            )
        if mountinfo.find(state.run_dir / "volume") is not None:
            # A running agent would keep using the old certificate and an older session.
            raise StateError(
                f"the volume of {root} is mounted (the agent is running, or a crashed run was "
                "not recovered yet)",
                "stop the agent (or run it once to recover) and retry",
            )
        if staging.exists():
            shutil.rmtree(staging)  # incomplete (no binding.mac): nothing was renewed with it
        tcti = tcti or ksmod.default_tcti()
        pcrs = parse_pcrs(pcrs_text) if pcrs_text else ()
        new = ksmod.create_keystore(staging, ksmod.KIND_TPM, tcti, pcrs)
        try:
            trio.run(renew_and_stage, state, new, staging)
            statemod.load_state(staging, tcti).forget()  # the staged state verifies
        except BaseException:
            new.discard()
            shutil.rmtree(staging, ignore_errors=True)
            raise
        new.close()
    finally:
        state.forget()
    commit(root, staging)
    return Migrated(state.appliance, tcti, resumed=False)


async def renew_and_stage(state: statemod.AgentState, new: ksmod.Keystore, staging: Path) -> None:
    """Get a certificate for a new TPM-held TLS key (revoking the old one) and stage the
    new state dir: same appliance, same sealing key (wrapped by the TPM now), same volume."""
    clock = timesync.Clock()
    try:
        # Both through the factory, so a migration behind the activation's proxy works.
        await timesync.sync(platform_client_for(state, clock, mutual=False).time, clock)
        client = platform_client_for(state, clock, mutual=True)
        boots = state.keystore.next_boot()
        await client.open_session(boots, state.keystore.kind)
        if isinstance(new, TpmKeystore):
            new.counter_base = boots  # the TPM's counter continues where the file's stopped
        pem, csr_pem = new_client_key_and_csr("scanner-appliance")
        key_pem = bytearray(pem)
        del pem
        try:
            cert_pem = await client.renew_certificate(csr_pem)
            doc = (state.root / statemod.STATE_JSON).read_bytes()
            activated_at = float(json.loads(doc).get("activated_at", clock.now()))
            hybrid = statemod.load_hybrid_key(state.keystore)  # moves too, when there is one
            # The appliance's volume-key shares move too: without them the volume never opens.
            shares = {name: state.keystore.load(name) for name in appliance_share_names(state.keystore)}
            try:
                # The proxy (URL and credentials) moves too: its credentials into the TPM.
                statemod.write_state(
                    staging, state.endpoint, state.appliance, state.ca_pem, cert_pem, key_pem,
                    state.seal_private(), activated_at, new, hybrid, state.proxy, shares,
                )
            finally:
                if hybrid is not None:
                    wipe(hybrid)
                for share in shares.values():
                    wipe(share)
        finally:
            wipe(key_pem)
    except PlatformError as e:
        raise platform_error(e, "renewing the certificate") from None


def commit(root: Path, staging: Path) -> None:
    """Move the staged state into place (binding.mac last), then shred the clear keys.

    Idempotent: after a crash part-way, what is left in *staging* is moved on the next run.
    """
    staged = sorted(p.name for p in staging.iterdir() if p.name != statemod.BINDING)
    for name in (*staged, statemod.BINDING):
        os.replace(staging / name, root / name)
    dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    old = FileKeystore(root).files(
        (*statemod.SECRET_NAMES, statemod.SEAL_KEY_HYBRID, statemod.PROXY_CREDENTIALS)
    )
    # Clear appliance shares whose TPM-wrapped copy is in place now.
    shares = [p.name for p in root.iterdir() if is_clear_share_file(p.name) and (root / f"{p.name}.tpm").exists()]
    for name in (*old, *shares, BOOT_COUNTER_FILE):
        _shred(root / name)
    staging.rmdir()


def _shred(path: Path) -> None:
    """Overwrite then remove a clear key file (best effort on journaling/flash storage)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return
    try:
        os.write(fd, os.urandom(os.fstat(fd).st_size))
        os.fsync(fd)
    finally:
        os.close(fd)
    path.unlink()
