"""Compatibility with cryptsetup (Debian cryptsetup-bin) and with the LUKS2 specification.

Everything here runs cryptsetup in modes that need no device-mapper: luksDump, open
--test-passphrase, luksFormat on a file, and offline reencrypt --encrypt / --decrypt.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from scratchfs.keyholder.wipe import wipe
from scratchfs.volume import api, userspace
from scratchfs.volume.errors import ErasedError, WrongKeyError
from scratchfs.volume.libcryptsetup import open_loaded
from tests.volume import luks2_reader
from tests.volume.conftest import MiB, Volumes, cryptsetup, requires_cryptsetup

pytestmark = requires_cryptsetup


def _files(root: Path) -> dict[str, bytes]:
    """A small tree of known files: text, binary, one spanning many sectors, an odd size."""
    content = {
        "a.txt": b"hello from the plaintext side\n",
        "dir/b.bin": os.urandom(300_001),
        "dir/sub/c.bin": os.urandom(4096 * 3 + 17),
        "empty": b"",
    }
    for rel, data in content.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return content


def _debugfs_cat(image: Path, rel: str, out: Path) -> bytes:
    """Read one file from an unmounted plaintext ext4 image with debugfs (no mount needed)."""
    out.unlink(missing_ok=True)
    subprocess.run(["debugfs", "-R", f"dump /{rel} {out}", str(image)], capture_output=True, check=True)
    return out.read_bytes()


def test_our_volume_passes_luksdump_and_test_passphrase(vols: Volumes) -> None:
    key = vols.key()
    image = vols.format("v.img", key)
    dump = cryptsetup("luksDump", str(image)).stdout.decode()
    assert "Version:       \t2" in dump
    assert "aes-xts-plain64" in dump
    assert "PBKDF:      pbkdf2" in dump and "Iterations: 1000" in dump
    assert "sector: 4096 [bytes]" in dump
    cryptsetup("open", "--test-passphrase", str(image), key=key)
    wrong = cryptsetup("open", "--test-passphrase", str(image), key=vols.key(), check=False)
    assert wrong.returncode != 0
    # Binary keys are used as-is: a trailing newline makes a different key.
    assert cryptsetup("open", "--test-passphrase", str(image), key=key + b"\n", check=False).returncode != 0


@pytest.mark.parametrize("kdf", ["argon2id", "pbkdf2"])
def test_cryptsetup_formatted_volume_opens_with_our_engine(vols: Volumes, kdf: str) -> None:
    key = vols.key()
    image = vols.path("cs.img")
    subprocess.run(["truncate", "-s", str(32 * MiB), str(image)], check=True)
    extra = ["--pbkdf-force-iterations", "1000"] if kdf == "pbkdf2" else [
        "--pbkdf-memory", "32768", "--pbkdf-force-iterations", "4", "--pbkdf-parallel", "1"]
    cryptsetup("luksFormat", "--type", "luks2", "--pbkdf", kdf, *extra, str(image), key=key)
    # Our engine builds the filesystem through the header cryptsetup wrote...
    with open_loaded(image) as dev:
        seg = dev.segment()
        _slot, master_key = dev.master_key(key)
    work = vols.path("mkfs-work")
    work.mkdir()
    userspace.make_filesystem(image, seg, master_key, work)
    wipe(master_key)
    # ... and opens it with the key to store files.
    vol = vols.open(image, "mnt", key)
    (vol.mountpoint / "f.txt").write_bytes(b"stored through our engine")
    vol.close()
    vol = vols.open(image, "mnt", key)
    assert (vol.mountpoint / "f.txt").read_bytes() == b"stored through our engine"
    vol.close()
    info = api.dump_volume(image)
    assert info["keyslots"][0]["kdf"] == kdf
    with pytest.raises(WrongKeyError):
        api.open_volume(image, vols.mountpoint("mnt"), vols.key(), "userspace", run_dir=vols.run_dir)


@pytest.mark.parametrize("sector_size", [512, 4096])
def test_cryptsetup_encrypted_ext4_reads_back_byte_for_byte(vols: Volumes, sector_size: int) -> None:
    key = vols.key()
    src = vols.path("src")
    content = _files(src)
    image = vols.path("p.img")
    subprocess.run(["truncate", "-s", str(40 * MiB), str(image)], check=True)
    # The filesystem must leave room for the header that --reduce-device-size makes.
    subprocess.run(["mkfs.ext4", "-q", "-b", "4096", "-d", str(src), "-E", "nodiscard",
                    str(image), "32M"], check=True)
    cryptsetup("reencrypt", "--encrypt", "--type", "luks2", "--reduce-device-size", "8M",
               "--sector-size", str(sector_size), "--pbkdf", "pbkdf2",
               "--pbkdf-force-iterations", "1000", str(image), key=key)
    assert api.dump_volume(image)["sector_size"] == sector_size
    vol = vols.open(image, "mnt", key)
    for rel, data in content.items():
        assert (vol.mountpoint / rel).read_bytes() == data, rel
    vol.close()


def test_our_data_decrypts_with_cryptsetup_and_the_spec_reader(vols: Volumes) -> None:
    key = vols.key()
    image = vols.format("o.img", key)
    vol = vols.open(image, "mnt", key)
    content = _files(vol.mountpoint)
    vol.close()
    blob = image.read_bytes()

    # 1. The independent reader written from the LUKS2 specification.
    plain = luks2_reader.decrypt_segment(blob, key)
    spec_img = vols.path("spec-plain.img")
    spec_img.write_bytes(plain)
    for rel, data in content.items():
        if data:
            assert _debugfs_cat(spec_img, rel, vols.path("out")) == data, rel
    with pytest.raises(PermissionError):
        luks2_reader.unlock(blob, vols.key())

    # 2. cryptsetup's offline decryption. LUKS2 decrypts only with a detached header whose
    # segment starts at 0, so: take the volume key with cryptsetup, put the data segment in its
    # own file and give it such a header with the same key, then reencrypt --decrypt.
    vk_file = vols.path("master_key.bin")
    cryptsetup("luksDump", "--dump-volume-key", "--volume-key-file", str(vk_file), str(image), key=key)
    data_img = vols.path("data.img")
    offset = api.dump_volume(image)["data_offset"]
    data_img.write_bytes(blob[offset:])
    header = vols.path("hdr.img")
    cryptsetup("luksFormat", "--type", "luks2", "--header", str(header),
               "--volume-key-file", str(vk_file), "--key-size", "512", "--cipher", "aes-xts-plain64",
               "--sector-size", "4096", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
               str(data_img), key=key)
    vk_file.unlink()
    cryptsetup("reencrypt", "--decrypt", "--header", str(header), "--force-offline-reencrypt",
               str(data_img), key=key)
    assert data_img.read_bytes()[:len(plain)] == plain
    for rel, data in content.items():
        if data:
            assert _debugfs_cat(data_img, rel, vols.path("out")) == data, rel


def test_erase_leaves_cryptsetup_unable_to_unlock(vols: Volumes) -> None:
    key = vols.key()
    image = vols.format("e.img", key)
    cryptsetup("open", "--test-passphrase", str(image), key=key)
    api.erase_volume(image)
    r = cryptsetup("open", "--test-passphrase", str(image), key=key, check=False)
    assert r.returncode != 0
    assert "Keyslots:\n" in cryptsetup("luksDump", str(image)).stdout.decode()
    assert api.dump_volume(image)["keyslots"] == []
    with pytest.raises(ErasedError):
        api.open_volume(image, vols.mountpoint("mnt"), key, "userspace", run_dir=vols.run_dir)
    with pytest.raises(PermissionError):
        luks2_reader.unlock(image.read_bytes(), key)


def test_rekey_is_seen_by_cryptsetup(vols: Volumes) -> None:
    old, new = vols.key(), vols.key()
    image = vols.format("r.img", old)
    api.change_passphrase(image, old, new)
    cryptsetup("open", "--test-passphrase", str(image), key=new)
    assert cryptsetup("open", "--test-passphrase", str(image), key=old, check=False).returncode != 0
    assert [k["kdf"] for k in api.dump_volume(image)["keyslots"]] == ["pbkdf2"]
