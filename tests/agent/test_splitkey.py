"""Split volume keys attacked through the public CLIs, with a real platform and a real agent.

The keyslot passphrase is HKDF(platform share || appliance share) (agent/volumekey.py). Each
attack below holds copies an attacker could hold and tries every key those copies yield on
the appliance's real volume image (cryptsetup's own keyslot check, and the agent's own
`scratchfs.volume.api.open_volume` for every key that must fail). Each also runs a
positive control: the same harness with the one missing piece added does open the volume,
so "wrong key" means the piece is missing, not that the harness is broken.

(a) the platform's whole state (database and KEK) + the disk: no appliance share;
(b) the disk + the keystore with the platform down or refusing: no platform share;
(c) after deactivation, the disk + the keystore (copied before the agent erased its
    keyslots) + the platform's state: the platform share is destroyed;
(d) rotations killed at every crash point still open and finish on the next boot; an
    appliance from before split keys migrates without re-imaging, next to one that stays old.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from agent import faults
from agent import state as statemod
from agent.errors import EXIT_DEACTIVATED, EXIT_PLATFORM, EXIT_QUARANTINED
from agent.unlock import share_name
from agent.volumekey import derive_keyslot_passphrase
from protocol import api
from scratchfs.keyholder.wipe import wipe
from scratchfs.volume import api as volume_api
from scratchfs.volume.errors import WrongKeyError
from tests.agent.conftest import AgentRun
from tests.agent.test_lifecycle import add_job, appliance_client, open_boot, volume_passphrase
from tests.volume.conftest import cryptsetup
from tools.demo import Platform, activate, mounts_under
from tools.loopback_targets import closed_port
from tools.platform import keys

ZERO = bytes(32)


# --- what an attacker does with copies ----------------------------------------------------------


def copy_platform_state(platform: Platform, dest: Path) -> Path:
    """Everything the platform keeps: state dir, database (with WAL), KEK, CA key."""
    shutil.copytree(platform.state, dest)
    return dest


def unwrapped_values(state_copy: Path) -> list[bytes]:
    """Every wrapped value in a copy of the platform's database, unwrapped with its KEK.

    Every BLOB of every table is tried as a keyslot passphrase wrap and as a share wrap of
    epochs 0-8, for every appliance row: an attacker with the KEK gets all of these."""
    kek = (state_copy / "kek.key").read_bytes()
    conn = sqlite3.connect(state_copy / "platform.db")
    try:
        rows = conn.execute("SELECT id, name FROM appliances").fetchall()
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        blobs = [v for t in tables for row in conn.execute(f'SELECT * FROM "{t}"') for v in row
                 if isinstance(v, bytes)]  # fmt: skip
    finally:
        conn.close()
    found: list[bytes] = []
    for blob in blobs:
        for app_id, name in rows:
            try:
                found.append(bytes(keys.unwrap(kek, blob, app_id, name)))
            except keys.WrapError:
                pass
            for epoch in range(9):
                try:
                    found.append(bytes(keys.unwrap_share(kek, blob, app_id, name, epoch)))
                except keys.WrapError:
                    pass
    return found


def keystore_secrets(disk: Path) -> dict[str, bytes]:
    """Every secret a copied disk's keystore could hold: with the file keystore each is a
    file of the state dir in clear, so every small file is a candidate (the volume image
    is not a secret of the keystore)."""
    return {p.name: p.read_bytes() for p in disk.iterdir() if p.is_file() and p.stat().st_size <= 64 * 1024}


def guesses(platform_parts: list[bytes], appliance_parts: list[bytes], name: str) -> Iterator[bytes]:
    """Every key the parts an attacker holds could yield: each as a passphrase itself, and
    through the derivation with each other part (or an all-zero / all-one share) in both
    positions, for epochs 1-3."""
    fillers = [ZERO, b"\xff" * 32]
    everything = platform_parts + appliance_parts
    yield from everything
    for p in platform_parts + fillers:
        for a in appliance_parts + platform_parts + fillers:
            if len(p) != 32 or len(a) != 32:
                continue
            for epoch in (1, 2, 3):
                yield bytes(derive_keyslot_passphrase(p, a, name, epoch))


def opens(image: Path, key: bytes, work: Path) -> bool:
    """Does *key* open a keyslot of *image*? Asked of cryptsetup itself (the reference LUKS2
    implementation, independent of our code; key on stdin); a key it refuses must also be
    refused by `scratchfs.volume.api.open_volume`, the agent's own call (WrongKeyError,
    nothing mounted). A key that opens is not mounted here: the tests' marker checks mount
    the volume with the keys that must work."""
    if cryptsetup("open", "--test-passphrase", str(image), key=key, check=False).returncode == 0:
        return True
    mnt = work / "try-mnt"
    mnt.mkdir(parents=True, exist_ok=True)
    with pytest.raises(WrongKeyError):
        volume_api.open_volume(image, mnt, key, run_dir=work / "try-run")
    return False


def any_opens(image: Path, keys_: Iterator[bytes], work: Path) -> int:
    """How many distinct candidate keys open *image* (0 is the attack failing)."""
    seen: set[bytes] = set()
    hits = 0
    for key in keys_:
        if len(key) != 32 or key in seen:
            continue
        seen.add(key)
        hits += opens(image, key, work)
    return hits


def copy_disk(appliance: Path, dest: Path) -> Path:
    """The appliance's disk: state dir (keystore included, file backend) and volume image."""
    shutil.copytree(appliance, dest, ignore=shutil.ignore_patterns("run"))
    return dest


# --- helpers ----------------------------------------------------------------------------------


def boot_once(
    agent_factory: Callable[..., AgentRun], state: Path, crash_at: str | None = None, platform: Platform | None = None
) -> AgentRun:
    """One ``scanner-agent run --once`` (optionally killed at a crash point), waited for.
    With *platform*, a job is queued first (``--once`` returns after one job)."""
    if platform is not None:
        add_job(platform, str(closed_port()))
    prefix: tuple[str, ...] = ("env", f"{faults.ENV}={crash_at}") if crash_at else ()
    run = agent_factory(state, "--once", "--poll-wait", "1", prefix=prefix)
    run.proc.wait(timeout=240)
    return run


def key_state(platform: Platform, name: str) -> dict[str, object]:
    [doc] = [a for a in json.loads(platform.cli("appliance", "list", "--json").stdout) if a["name"] == name]
    return {k: doc[k] for k in ("key_scheme", "key_epoch", "key_pending_epoch")}


def appliance_shares(state: Path) -> list[str]:
    st = statemod.load_state(state)
    return sorted({p.name.split(".", 1)[0] for p in st.keystore.root.iterdir()
                   if p.name.startswith("volume-share-")})  # fmt: skip


def db_holds(platform: Platform, needle: bytes) -> bool:
    return any(needle in p.read_bytes() for p in platform.state.iterdir() if p.name.startswith("platform.db"))


def wrapped_share_now(platform: Platform, name: str) -> bytes:
    conn = sqlite3.connect(platform.state / "platform.db")
    try:
        row = conn.execute("SELECT wrapped_share FROM appliances WHERE name = ?", (name,)).fetchone()
    finally:
        conn.close()
    assert row is not None and row[0] is not None
    return bytes(row[0])


@pytest.fixture
def split_appliance(platform: Platform, activated: Path, agent_factory: Callable[..., AgentRun]) -> Path:
    """'app1' after its first boot: volume formatted under split key epoch 1."""
    run = boot_once(agent_factory, activated, platform=platform)
    log = run.stderr()
    assert run.proc.returncode == 0, log[-2000:]
    assert "event=split_key_migration epoch=1" in log and "event=first_boot_split_key epoch=1" in log
    assert "event=volume_key_committed epoch=1 old_destroyed_proven=True" in log
    assert key_state(platform, "app1") == {"key_scheme": "split", "key_epoch": 1, "key_pending_epoch": None}
    assert appliance_shares(activated) == ["volume-share-1"]
    return activated


# --- (a) the data center alone ---------------------------------------------------------------


def test_platform_state_and_disk_copy_cannot_open_the_volume(
    platform: Platform, split_appliance: Path, tmp_path: Path,
) -> None:
    stolen = copy_platform_state(platform, tmp_path / "stolen-platform")
    disk = copy_disk(split_appliance, tmp_path / "stolen-disk")
    image = disk / "volume.img"
    platform_parts = unwrapped_values(stolen)
    assert len(platform_parts) == 1  # the platform share of epoch 1: nothing else is left
    # The legacy passphrase the platform created at activation is destroyed, not just unused.
    assert any_opens(image, guesses(platform_parts, [], "app1"), tmp_path / "a") == 0
    # Positive control: the same stolen share plus the appliance's share (which never left
    # its keystore) does open it, so the harness would have noticed a working key.
    appliance_parts = list(keystore_secrets(disk).values())
    assert any_opens(image, guesses(platform_parts, appliance_parts, "app1"), tmp_path / "a") == 1
    assert mounts_under(tmp_path) == []


# --- (b) the appliance alone -------------------------------------------------------------------


def test_disk_and_keystore_without_the_platform_cannot_open_the_volume(
    platform: Platform, split_appliance: Path, agent_factory: Callable[..., AgentRun], tmp_path: Path,
) -> None:
    disk = copy_disk(split_appliance, tmp_path / "stolen-disk")
    secrets = keystore_secrets(disk)
    assert share_name(1) in secrets  # the appliance share is there, and TLS/sealing keys too
    assert any_opens(disk / "volume.img", guesses([], list(secrets.values()), "app1"), tmp_path / "b") == 0

    # Refusing: the disk restored from a copy (its boot counter behind the platform's
    # record) is a clone sign; the platform quarantines it, the agent exits 31, nothing mounted.
    counter = split_appliance / "boot-counter"
    saved = counter.read_bytes()
    st, client = appliance_client(split_appliance)
    trio.run(open_boot, st, client)  # the original boots on meanwhile
    counter.write_bytes(saved)
    refused = boot_once(agent_factory, split_appliance)
    assert refused.proc.returncode == EXIT_QUARANTINED, refused.stderr()[-2000:]
    assert "event=volume_open" not in refused.stderr() and mounts_under(split_appliance) == []

    # Unreachable: the platform is down; the agent exits 22, nothing mounted.
    platform.stop()
    down = boot_once(agent_factory, split_appliance)
    assert down.proc.returncode == EXIT_PLATFORM, down.stderr()[-2000:]
    assert down.stderr().strip().splitlines()[-1].startswith("scanner-agent: ")
    assert "event=volume_open" not in down.stderr() and mounts_under(split_appliance) == []


# --- (c) after deactivation ------------------------------------------------------------------


def test_after_deactivation_nothing_opens_even_with_disk_and_keystore(
    platform: Platform, split_appliance: Path, agent_factory: Callable[..., AgentRun], tmp_path: Path,
) -> None:
    run = agent_factory(split_appliance, "--poll-wait", "1")
    assert run.wait_log("event=scratch_mounted"), run.stderr()[-2000:]
    # The attacker's copies from before deactivation: the whole disk with its keyslots and
    # keystore, and (control) the platform's state.
    disk = copy_disk(split_appliance, tmp_path / "disk-before")
    platform_before = copy_platform_state(platform, tmp_path / "platform-before")
    image = disk / "volume.img"
    assert volume_api.dump_volume(image)["keyslots"]
    appliance_parts = list(keystore_secrets(disk).values())
    before = unwrapped_values(platform_before)
    share_before = wrapped_share_now(platform, "app1")

    out = platform.cli("appliance", "deactivate", "app1").stdout.decode()
    assert "verified absent" in out
    run.proc.wait(timeout=120)
    assert run.proc.returncode == EXIT_DEACTIVATED, run.stderr()[-2000:]
    assert "event=volume_erased" in run.stderr()

    # Control (nothing of ours mounted while the agent ran): the platform's state from
    # before deactivation, with the disk and keystore, opens it. That is why backups of
    # the platform's database must not outlive a deactivation (docs/platform.md).
    assert any_opens(image, guesses(before, appliance_parts, "app1"), tmp_path / "c") == 1
    after = copy_platform_state(platform, tmp_path / "platform-after")
    assert unwrapped_values(after) == []
    assert any_opens(image, guesses(unwrapped_values(after), appliance_parts, "app1"), tmp_path / "c") == 0
    # The platform share is gone from the database files, not just from the row.
    assert not db_holds(platform, share_before) and not db_holds(platform, share_before[1:13])
    assert mounts_under(tmp_path) == [] and mounts_under(split_appliance) == []


# --- (d) rotation, crash-safe at every step ------------------------------------------------------


def test_rotation_killed_at_every_step_still_opens_and_finishes(
    platform: Platform, split_appliance: Path, agent_factory: Callable[..., AgentRun], tmp_path: Path,
) -> None:
    marker = b"survives every rotation"
    (tmp_path / "m").mkdir()
    key = volume_passphrase(split_appliance)
    try:
        vol = volume_api.open_volume(split_appliance / "volume.img", tmp_path / "m", key, run_dir=tmp_path / "r")
    finally:
        wipe(key)
    try:
        (tmp_path / "m" / "marker").write_bytes(marker)
    finally:
        vol.close()

    for epoch, crash_at in ((2, "unlock:share_stored"), (3, "unlock:rotated"), (4, "unlock:committed")):
        old_share = wrapped_share_now(platform, "app1")
        out = platform.cli("appliance", "rotate-volume-key", "app1").stdout.decode()
        assert f"epoch {epoch} pending" in out and "next boot" in out
        again = platform.cli("appliance", "rotate-volume-key", "app1").stdout.decode()
        assert f"epoch {epoch} is pending already" in again
        assert key_state(platform, "app1")["key_pending_epoch"] == epoch

        killed = boot_once(agent_factory, split_appliance, crash_at=crash_at)
        assert killed.proc.returncode == -9, (crash_at, killed.stderr()[-2000:])
        assert mounts_under(split_appliance) == []

        run = boot_once(agent_factory, split_appliance, platform=platform)
        log = run.stderr()
        assert run.proc.returncode == 0, (crash_at, log[-2000:])
        assert "first_boot_format" not in log and "event=volume_open" in log
        assert key_state(platform, "app1") == {"key_scheme": "split", "key_epoch": epoch, "key_pending_epoch": None}
        assert appliance_shares(split_appliance) == [share_name(epoch)]
        assert not db_holds(platform, old_share) and not db_holds(platform, old_share[1:13])
        assert len(volume_api.dump_volume(split_appliance / "volume.img")["keyslots"]) == 1

    key = volume_passphrase(split_appliance)
    try:
        vol = volume_api.open_volume(split_appliance / "volume.img", tmp_path / "m", key, run_dir=tmp_path / "r")
    finally:
        wipe(key)
    try:
        assert (tmp_path / "m" / "marker").read_bytes() == marker  # same volume, never re-imaged
    finally:
        vol.close()


# --- migration: appliances from before split keys ---------------------------------------------


def format_as_an_old_agent(state: Path, work: Path, marker: bytes) -> None:
    """What an agent from before split keys leaves: a volume formatted with the platform's
    keyslot passphrase itself (GET /v1/volume-key, scheme "passphrase"), holding data."""
    st, client = appliance_client(state)
    trio.run(open_boot, st, client)
    sealed = trio.run(client.keyslot_passphrase)
    key = st.open_sealed(sealed, api.SEAL_CONTEXT_VOLUME_KEY)
    try:
        volume_api.format_volume(st.volume_image, 32 * 1024 * 1024, key, run_dir=work / "r")
        vol = volume_api.open_volume(st.volume_image, work / "m", key, run_dir=work / "r")
    finally:
        wipe(key)
    try:
        (work / "m" / "marker").write_bytes(marker)
    finally:
        vol.close()


def test_old_appliance_migrates_without_reimaging_next_to_one_that_stays_old(
    platform: Platform, activated: Path, agent_factory: Callable[..., AgentRun], tmp_path: Path,
) -> None:
    marker = os.urandom(16)
    for sub in ("w1/m", "w2/m", "m"):
        (tmp_path / sub).mkdir(parents=True)
    format_as_an_old_agent(activated, tmp_path / "w1", marker)
    legacy = tmp_path / "legacy-app"
    activate(platform, "legacy", legacy)
    format_as_an_old_agent(legacy, tmp_path / "w2", b"old")
    assert key_state(platform, "app1")["key_scheme"] == "passphrase"
    conn = sqlite3.connect(platform.state / "platform.db")
    try:
        [(wrapped_passphrase,)] = conn.execute("SELECT wrapped_volume_key FROM appliances WHERE name = 'app1'")
    finally:
        conn.close()

    # The first split-aware boot is killed after re-keying, before telling the platform.
    killed = boot_once(agent_factory, activated, crash_at="unlock:rotated")
    assert killed.proc.returncode == -9, killed.stderr()[-2000:]
    assert "event=split_key_migration epoch=1" in killed.stderr()
    assert "event=keyslot_rotated epoch=1 outcome=rotated" in killed.stderr()
    assert key_state(platform, "app1") == {"key_scheme": "passphrase", "key_epoch": None, "key_pending_epoch": 1}

    run = boot_once(agent_factory, activated, platform=platform)
    log = run.stderr()
    assert run.proc.returncode == 0, log[-2000:]
    assert "first_boot_format" not in log and "event=keyslot_rotated epoch=1 outcome=done" in log
    assert key_state(platform, "app1") == {"key_scheme": "split", "key_epoch": 1, "key_pending_epoch": None}
    assert not db_holds(platform, bytes(wrapped_passphrase)[1:13])  # the passphrase is shredded
    key = volume_passphrase(activated)
    try:
        vol = volume_api.open_volume(activated / "volume.img", tmp_path / "m", key, run_dir=tmp_path / "r")
    finally:
        wipe(key)
    try:
        assert (tmp_path / "m" / "marker").read_bytes() == marker
    finally:
        vol.close()

    # The other appliance still runs an old agent: it keeps its passphrase, on the same platform.
    assert key_state(platform, "legacy") == {"key_scheme": "passphrase", "key_epoch": None, "key_pending_epoch": None}
    st, client = appliance_client(legacy)
    trio.run(open_boot, st, client)
    key = st.open_sealed(trio.run(client.keyslot_passphrase), api.SEAL_CONTEXT_VOLUME_KEY)
    try:
        assert opens(legacy / "volume.img", bytes(key), tmp_path / "w2")
    finally:
        wipe(key)
    table = platform.cli("appliance", "list").stdout.decode()
    assert "split epoch 1" in table and "passphrase" in table
