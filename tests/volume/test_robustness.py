"""Crash safety of header updates, corrupted images, and close after a killed FUSE server."""

from __future__ import annotations

import hashlib
import hmac
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from scratchfs.keyholder import mountinfo, procs
from scratchfs.keyholder.wipe import wipe
from scratchfs.volume import api
from scratchfs.volume import state as statemod
from scratchfs.volume.errors import BadImageError, VolumeError, WrongKeyError
from scratchfs.volume.libcryptsetup import open_loaded
from tests.mounting import is_mounted
from tests.volume.conftest import MiB, Volumes, cryptsetup, loop_devices_under, mounts_under, requires_cryptsetup
from tests.volume.luks2_reader import rewrite_metadata

VOLUME = [sys.executable, "-m", "scratchfs.volume"]


def master_key_of(image: Path, key: bytes) -> bytes | None:
    """The volume master key if the keyslot passphrase *key* opens *image*, None if it does not."""
    try:
        with open_loaded(image) as dev:
            _slot, master_key = dev.master_key(key)
    except (WrongKeyError, VolumeError):
        return None
    out = bytes(master_key)
    wipe(master_key)
    return out


def run_cli(*args: str, key: bytes | None = None, run_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    extra = ["--run-dir", str(run_dir)] if run_dir else []
    return subprocess.run(
        [*VOLUME, *args, *extra], input=key.decode("latin-1") if key is not None else None,
        capture_output=True, text=True, timeout=120, check=False, encoding="latin-1",
    )


def assert_one_line_error(r: subprocess.CompletedProcess[str], code: int) -> None:
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("scratchfs: ") and ";" in lines[0], lines[0]
    assert "Traceback" not in r.stderr


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# -- crash safety ---------------------------------------------------------------------------

_REKEY_LOOP = """
import sys
from pathlib import Path
from scratchfs.volume import api
keys = sys.stdin.buffer.read(64)
a, b = keys[:32], keys[32:]
print("started", flush=True)
while True:
    api.change_passphrase(Path(sys.argv[1]), a, b)
    api.change_passphrase(Path(sys.argv[1]), b, a)
"""

_ERASE_LOOP = """
import sys
from pathlib import Path
from scratchfs.volume.libcryptsetup import open_loaded
keys = sys.stdin.buffer.read(128)
a, b, master_key = keys[:32], keys[32:64], keys[64:]
print("started", flush=True)
while True:
    with open_loaded(Path(sys.argv[1])) as dev:
        for k in (a, b):
            if not dev.active_keyslots() or len(dev.active_keyslots()) < 2:
                dev.add_keyslot(k, master_key)
        for slot in dev.active_keyslots():
            dev.destroy_keyslot(slot)
"""


def _kill_at_random(script: str, image: Path, keys: bytes, rng: random.Random) -> None:
    proc = subprocess.Popen([sys.executable, "-c", script, str(image)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(keys)
    proc.stdin.close()
    assert proc.stdout.readline().strip() == b"started"
    time.sleep(rng.uniform(0.0, 0.25))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    proc.stdout.close()


def test_rekey_killed_at_random_moments_always_opens_with_old_or_new_key(vols: Volumes) -> None:
    rng = random.Random(0x5EED)
    a, b = vols.key(), vols.key()
    image = vols.format("k.img", a, size=16 * MiB)
    original = master_key_of(image, a)
    assert original is not None
    for _ in range(12):
        _kill_at_random(_REKEY_LOOP, image, a + b, rng)
        opened = [mk for mk in (master_key_of(image, a), master_key_of(image, b)) if mk is not None]
        assert opened, "after a kill during rekey the volume opened with neither key"
        assert all(hmac.compare_digest(master_key, original) for master_key in opened)
    # The volume is still a whole volume: it mounts with a key that opens it.
    key = a if master_key_of(image, a) else b
    vols.open(image, "mnt", key).close()


def test_erase_killed_at_random_moments_leaves_a_valid_header(vols: Volumes) -> None:
    rng = random.Random(0xE7A5E)
    a, b = vols.key(), vols.key()
    image = vols.format("e.img", a, size=16 * MiB)
    original = master_key_of(image, a)
    assert original is not None
    for _ in range(12):
        # The child holds the volume key itself (handed over on stdin), so it can put keyslots
        # back after a kill left the volume erased.
        _kill_at_random(_ERASE_LOOP, image, a + b + original, rng)
        # Old state (a key opens, to the same volume key) or new state (erased); the header
        # always loads: never a volume that is neither.
        info = api.dump_volume(image)
        for k in (a, b):
            master_key = master_key_of(image, k)
            assert master_key is None or hmac.compare_digest(master_key, original)
        assert len(info["keyslots"]) <= 2
    api.erase_volume(image)
    assert api.dump_volume(image)["keyslots"] == []
    assert master_key_of(image, a) is None and master_key_of(image, b) is None


def test_format_killed_at_random_moments_leaves_no_image_or_a_whole_one(vols: Volumes) -> None:
    rng = random.Random(0xF0)
    key = vols.key()
    image = vols.path("f.img")
    outcomes = set()
    for _ in range(6):
        image.unlink(missing_ok=True)
        proc = subprocess.Popen(
            [*VOLUME, "format", str(image), "--size", "16M", "--key-fd", "0",
             "--run-dir", str(vols.run_dir)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        assert proc.stdin is not None
        proc.stdin.write(key)
        proc.stdin.close()
        time.sleep(rng.uniform(0.2, 1.6))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        # The FUSE server of a killed format dies with it and takes its mount along.
        deadline = time.monotonic() + 15
        while mounts_under(vols.run_dir) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not mounts_under(vols.run_dir)
        assert not loop_devices_under(vols.root)
        if image.exists():
            outcomes.add("complete")
            assert master_key_of(image, key) is not None
            vols.open(image, "mnt", key).close()
        else:
            outcomes.add("absent")
    # A new format on the same path cleans what killed ones left.
    image.unlink(missing_ok=True)
    vols.format("f.img", key, size=16 * MiB)
    assert not list(vols.path(".").glob(".f.img.formatting"))
    assert outcomes  # at least one kind was seen; both are valid


# -- corrupted images -----------------------------------------------------------------------

def _flip(image: Path, offset: int) -> None:
    with open(image, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


@pytest.mark.parametrize("damaged", ["primary", "secondary"])
def test_one_damaged_header_copy_still_opens(vols: Volumes, damaged: str) -> None:
    key = vols.key()
    image = vols.format("d.img", key, size=16 * MiB)
    metadata_size = api.dump_volume(image)["metadata_size"]
    # A byte in the JSON area breaks that copy's checksum.
    _flip(image, (0 if damaged == "primary" else metadata_size) + 4096 + 10)
    vol = vols.open(image, "mnt", key)
    (vol.mountpoint / "x").write_bytes(b"still works")
    vol.close()


def test_both_header_copies_damaged_is_refused_in_one_line(vols: Volumes) -> None:
    key = vols.key()
    image = vols.format("d.img", key, size=16 * MiB)
    metadata_size = api.dump_volume(image)["metadata_size"]
    _flip(image, 4096 + 10)
    _flip(image, metadata_size + 4096 + 10)
    r = run_cli("open", str(image), str(vols.mountpoint("mnt")), "--key-fd", "0", key=key,
                run_dir=vols.run_dir)
    assert_one_line_error(r, 11)
    assert_one_line_error(run_cli("dump", str(image)), 11)
    assert not is_mounted(vols.path("mnt"))


@requires_cryptsetup
def test_bad_images_are_refused_in_one_line(vols: Volumes) -> None:
    key = vols.key()
    mnt = str(vols.mountpoint("mnt"))
    good = vols.format("good.img", key, size=16 * MiB)
    data_offset = api.dump_volume(good)["data_offset"]
    cases: dict[str, Path] = {}
    # Header cut in the middle.
    cases["cut"] = vols.path("cut.img")
    cases["cut"].write_bytes(good.read_bytes()[:8192])
    # Header intact, data segment gone.
    cases["nodata"] = vols.path("nodata.img")
    cases["nodata"].write_bytes(good.read_bytes()[:data_offset])
    cases["random"] = vols.path("random.img")
    cases["random"].write_bytes(os.urandom(4 * MiB))
    cases["empty"] = vols.path("empty.img")
    cases["empty"].write_bytes(b"")
    cases["luks1"] = vols.path("luks1.img")
    subprocess.run(["truncate", "-s", str(8 * MiB), str(cases["luks1"])], check=True)
    cryptsetup("luksFormat", "--type", "luks1", "--pbkdf-force-iterations", "1000",
               str(cases["luks1"]), key=key)
    for name, image in cases.items():
        before = sha256(image)
        r = run_cli("open", str(image), mnt, "--key-fd", "0", key=key, run_dir=vols.run_dir)
        assert_one_line_error(r, 11)
        assert sha256(image) == before, f"{name}: refused open modified the image"
        if name == "luks1":
            assert "LUKS1" in r.stderr
        if name != "nodata":
            assert_one_line_error(run_cli("dump", str(image)), 11)
            with pytest.raises(BadImageError):
                api.erase_volume(image)
    assert not is_mounted(Path(mnt))
    assert not loop_devices_under(vols.root)


def test_wrong_key_is_refused_and_changes_nothing(vols: Volumes) -> None:
    key = vols.key()
    image = vols.format("w.img", key, size=16 * MiB)
    before = sha256(image)
    r = run_cli("open", str(image), str(vols.mountpoint("mnt")), "--key-fd", "0",
                key=vols.key(), run_dir=vols.run_dir)
    assert_one_line_error(r, 10)
    assert sha256(image) == before
    assert not is_mounted(vols.path("mnt"))
    assert not (vols.run_dir.exists() and list(vols.run_dir.iterdir()))


# -- close after the FUSE server was killed ------------------------------------------------

# The kernel writes space, tab, newline and backslash in mountinfo as \ooo escapes and other
# bytes (UTF-8) raw: a path with both must still be found mounted, then stale, then closed.
ODD_NAME = "mnt ü\\ß x"


@pytest.mark.parametrize(("how", "name"), [("api", "mnt"), ("cli", "mnt"), ("cli", ODD_NAME)])
def test_close_after_fuse_server_was_killed(vols: Volumes, how: str, name: str) -> None:
    key = vols.key()
    if name != "mnt":
        vols.run_dir = vols.root / f"run {name}"  # the FUSE mount point gets the odd name too
    image = vols.format("k.img", key, size=16 * MiB)
    vol = vols.open(image, name, key)
    (vol.mountpoint / "f").write_bytes(b"x" * 10000)
    st = statemod.load(statemod.state_dir(vols.run_dir, vol.mountpoint))
    assert st is not None and st.server_pid and st.server_start and st.fuse_dir
    assert is_mounted(vol.mountpoint) and is_mounted(Path(st.fuse_dir))
    os.kill(st.server_pid, signal.SIGKILL)
    assert procs.wait_gone(st.server_pid, st.server_start, 10)
    assert mountinfo.is_stale(st.fuse_dir)
    if vol.server and vol.server.process:
        vol.server.process.wait(timeout=10)
    if how == "api":
        api.close_volume(vol.mountpoint, run_dir=vols.run_dir)
    else:
        r = run_cli("close", str(vol.mountpoint), run_dir=vols.run_dir)
        assert r.returncode == 0, r.stderr
    assert not is_mounted(vol.mountpoint)
    assert not is_mounted(Path(st.fuse_dir))
    assert not loop_devices_under(vols.root) and not loop_devices_under(vols.run_dir)
    assert not procs.alive(st.server_pid, st.server_start)
    # The volume itself survived (ext4 journal): it opens again.
    vols.open(image, name, key).close()


# -- hostile KDF parameters ---------------------------------------------------------------------
HOSTILE_HEADERS: dict[str, Callable[[dict[str, Any]], None]] = {
    "pbkdf2 2^32-1 iterations": lambda ks: ks["kdf"].update(iterations=2**32 - 1),
    "huge keyslot key size": lambda ks: ks.update(key_size=1 << 24),
    "huge area key size": lambda ks: ks["area"].update(key_size=1 << 24),
    "argon2 time 2^32-1": lambda ks: ks.update(kdf={"type": "argon2id", "time": 2**32 - 1, "memory": 1024,
                                                  "cpus": 1, "salt": ks["kdf"]["salt"]}),
    "argon2 memory 4 GiB": lambda ks: ks.update(kdf={"type": "argon2id", "time": 4, "memory": 4 << 20,
                                                   "cpus": 1, "salt": ks["kdf"]["salt"]}),
}


@requires_cryptsetup
def test_hostile_kdf_parameters_are_refused_before_any_derivation(vols: Volumes) -> None:
    """A header crafted to make unlock run for hours is refused within seconds, exit 11, one line."""
    key = vols.key()
    good = vols.path("kdf.img")
    subprocess.run(["truncate", "-s", str(4 * MiB), str(good)], check=True)
    cryptsetup("luksFormat", "--type", "luks2", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
               str(good), key=key)
    mnt = str(vols.mountpoint("mnt"))
    for name, mutate in HOSTILE_HEADERS.items():
        image = vols.path(f"kdf-{sorted(HOSTILE_HEADERS).index(name)}.img")
        image.write_bytes(good.read_bytes())

        def craft(meta: dict[str, Any], mutate: Callable[[dict[str, Any]], None] = mutate) -> None:
            for ks in meta["keyslots"].values():
                mutate(ks)

        rewrite_metadata(image, craft)
        t0 = time.monotonic()
        r = run_cli("open", str(image), mnt, "--key-fd", "0", key=key, run_dir=vols.run_dir)
        elapsed = time.monotonic() - t0
        assert_one_line_error(r, 11)
        assert "keyslot 0" in r.stderr and "more than" in r.stderr, (name, r.stderr)
        assert elapsed < 10, f"{name}: refusal took {elapsed:.1f}s"
        with pytest.raises(BadImageError):
            master_key_of_strict(image, key)
    # Control: the untouched image still unlocks with the same code path.
    assert master_key_of(good, key) is not None
    assert not is_mounted(Path(mnt))


def master_key_of_strict(image: Path, key: bytes) -> None:
    with open_loaded(image) as dev:
        _slot, master_key = dev.master_key(key)
        wipe(master_key)
