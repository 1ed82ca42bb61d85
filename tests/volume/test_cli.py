"""`scratchfs volume ...` end to end: real processes, keys only through file descriptors."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scratchfs.volume import api, cli
from tests.mounting import is_mounted
from tests.volume.conftest import Volumes, cryptsetup, loop_devices_under, requires_cryptsetup
from tests.volume.test_robustness import assert_one_line_error

SCRATCHFS = [sys.executable, "-m", "scratchfs", "volume"]


def run(args: list[str], key: bytes | None = None, pipe: bool = False,
        extra_fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess[bytes]:
    """Run the CLI; the key goes through stdin, or (pipe=True) through a pipe whose descriptor
    number replaces "{fd}" in *args*."""
    pass_fds: list[int] = list(extra_fds)
    r_fd = None
    if pipe and key is not None:
        r_fd, w_fd = os.pipe()
        os.write(w_fd, key)
        os.close(w_fd)
        pass_fds.append(r_fd)
        args = [a.replace("{fd}", str(r_fd)) for a in args]
    try:
        return subprocess.run([*SCRATCHFS, *args], input=None if pipe else key, capture_output=True,
                              timeout=120, check=False, pass_fds=pass_fds)
    finally:
        if r_fd is not None:
            os.close(r_fd)


def test_parse_size() -> None:
    assert cli.parse_size("64M") == 64 << 20
    assert cli.parse_size("1g") == 1 << 30
    assert cli.parse_size("512KiB") == 512 << 10
    assert cli.parse_size("4096") == 4096
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_size("lots")


def test_full_cycle_through_the_cli(vols: Volumes) -> None:
    key = vols.key()
    image = vols.path("c.img")
    mnt = vols.mountpoint("mnt")
    rd = ["--run-dir", str(vols.run_dir)]
    r = run(["format", str(image), "--size", "32M", "--key-fd", "{fd}", *rd], key=key, pipe=True)
    assert r.returncode == 0, r.stderr
    r = run(["open", str(image), str(mnt), "--key-fd", "0", *rd], key=key)
    assert r.returncode == 0, r.stderr
    vols.track(mnt)
    assert is_mounted(mnt)
    (mnt / "hello").write_text("through the CLI")
    # Opening twice: busy.
    assert_one_line_error_b(run(["open", str(image), str(vols.mountpoint("m2")), "--key-fd", "0", *rd], key=key), 13)
    r = run(["close", str(mnt), *rd])
    assert r.returncode == 0, r.stderr
    assert not is_mounted(mnt) and not loop_devices_under(vols.root)
    assert_one_line_error_b(run(["close", str(mnt), *rd]), 14)
    r = run(["dump", str(image), "--json"])
    assert r.returncode == 0
    info = json.loads(r.stdout)
    assert info["format"] == "LUKS2" and info["sector_size"] == 4096 and len(info["keyslots"]) == 1
    assert info["keyslots"][0] == {"slot": 0, "type": "luks2", "unbound": False, "key_bits": 512, "kdf": "pbkdf2",
                                   "hash": "sha256", "iterations": 1000}
    # The key never shows up in any output, in any encoding.
    for out in (r.stdout, r.stderr, run(["dump", str(image)]).stdout):
        assert key not in out and key.hex().encode() not in out
    new = vols.key()
    r0, w0 = os.pipe()
    os.write(w0, new)
    os.close(w0)
    try:
        r = run(["rekey", str(image), "--key-fd", "0", "--new-key-fd", str(r0)], key=key, extra_fds=(r0,))
    finally:
        os.close(r0)
    assert r.returncode == 0, r.stderr
    assert_one_line_error_b(run(["open", str(image), str(mnt), "--key-fd", "0", *rd], key=key), 10)
    r = run(["open", str(image), str(mnt), "--key-fd", "0", *rd], key=new)
    assert r.returncode == 0, r.stderr
    vols.track(mnt)
    assert (mnt / "hello").read_text() == "through the CLI"
    assert run(["close", str(mnt), *rd]).returncode == 0
    r = run(["erase", str(image)])
    assert r.returncode == 0
    assert_one_line_error_b(run(["open", str(image), str(mnt), "--key-fd", "0", *rd], key=new), 17)


def assert_one_line_error_b(r: subprocess.CompletedProcess[bytes], code: int) -> None:
    assert_one_line_error(
        subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(), r.stderr.decode()), code
    )


def test_key_input_errors(vols: Volumes) -> None:
    image = vols.path("k.img")
    # Not 32 bytes: a platform key is exactly 32 random bytes.
    assert_one_line_error_b(run(["format", str(image), "--size", "32M", "--key-fd", "0"], key=b"short"), 16)
    assert_one_line_error_b(run(["format", str(image), "--size", "32M", "--key-fd", "0"], key=b""), 16)
    assert_one_line_error_b(run(["format", str(image), "--size", "32M", "--key-fd", "0"],
                                key=os.urandom(api.MAX_PASSPHRASE_SIZE + 1)), 16)
    # A closed descriptor.
    assert_one_line_error_b(run(["format", str(image), "--size", "32M", "--key-fd", "55"]), 16)
    assert not image.exists()


def test_usage_errors_exit_2(vols: Volumes) -> None:
    image = vols.path("u.img")
    r = run(["format", str(image), "--size", "32M"])  # no --key-fd: the key is never an argument
    assert r.returncode == 2
    r = run(["format", str(image), "--size", "1M", "--key-fd", "0"], key=vols.key())
    assert_one_line_error_b(r, 2)
    r = run(["open", str(image), str(vols.root), "--key-fd", "0", "--backend", "magic"], key=vols.key())
    assert r.returncode == 2


def test_path_errors(vols: Volumes) -> None:
    key = vols.key()
    assert_one_line_error_b(run(["open", str(vols.path("none.img")), str(vols.mountpoint("m")),
                                 "--key-fd", "0", "--run-dir", str(vols.run_dir)], key=key), 18)
    image = vols.format("p.img", key, size=16 << 20)
    assert_one_line_error_b(run(["open", str(image), str(vols.path("nodir")), "--key-fd", "0",
                                 "--run-dir", str(vols.run_dir)], key=key), 18)
    # format refuses to overwrite an existing image
    assert_one_line_error_b(run(["format", str(image), "--size", "16M", "--key-fd", "0"], key=key), 13)


def test_dmcrypt_backend_without_device_mapper_is_a_clear_error(vols: Volumes) -> None:
    from scratchfs.volume import dmcrypt

    if dmcrypt.available():
        pytest.skip("device-mapper is available here; the error path cannot be shown")
    key = vols.key()
    image = vols.format("d.img", key, size=16 << 20)
    r = run(["open", str(image), str(vols.mountpoint("m")), "--key-fd", "0", "--backend", "dmcrypt",
             "--run-dir", str(vols.run_dir)], key=key)
    assert_one_line_error_b(r, 12)
    assert b"device-mapper" in r.stderr


def test_open_and_close_from_the_module_entry_point(vols: Volumes, tmp_path: Path) -> None:
    """`python -m scratchfs.volume` runs the same commands (daemonized server, returns when live)."""
    key = vols.key()
    image = vols.format("m.img", key, size=16 << 20)
    mnt = vols.mountpoint("mm")
    r = subprocess.run([sys.executable, "-m", "scratchfs.volume", "open", str(image), str(mnt),
                        "--key-fd", "0", "--run-dir", str(vols.run_dir)], input=key,
                       capture_output=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    vols.track(mnt)
    assert is_mounted(mnt)
    r = subprocess.run([sys.executable, "-m", "scratchfs.volume", "close", str(mnt),
                        "--run-dir", str(vols.run_dir)], capture_output=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert not is_mounted(mnt)


def _luks2_without_ext4(vols: Volumes, name: str) -> tuple[Path, bytes]:
    """A LUKS2 image made by cryptsetup whose data segment was never formatted."""
    key = vols.key()
    image = vols.path(name)
    subprocess.run(["truncate", "-s", str(24 << 20), str(image)], check=True)
    cryptsetup("luksFormat", "--type", "luks2", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
               "--luks2-metadata-size", "16k", "--luks2-keyslots-size", "1m", str(image), key=key)
    return image, key


@requires_cryptsetup
def test_open_without_ext4_inside_exits_11_and_leaves_nothing(vols: Volumes) -> None:
    image, key = _luks2_without_ext4(vols, "noext4.img")
    mnt = vols.mountpoint("mnt")
    rd = ["--run-dir", str(vols.run_dir), "--backend", "userspace"]
    r = run(["open", str(image), str(mnt), "--key-fd", "0", *rd], key=key)
    assert_one_line_error_b(r, 11)
    assert b"holds no ext4 filesystem" in r.stderr, r.stderr
    assert not is_mounted(mnt) and not loop_devices_under(vols.root)
    # The positive side (a formatted image passes the superblock check) is every other open test.


@requires_cryptsetup
def test_dump_marks_unbound_keyslots_as_cryptsetup_does(vols: Volumes, tmp_path: Path) -> None:
    image, _key = _luks2_without_ext4(vols, "unbound.img")
    unbound_key = tmp_path / "unbound.key"
    unbound_key.write_bytes(vols.key())
    cryptsetup("luksAddKey", "--unbound", "-s", "256", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
               str(image), str(unbound_key))
    theirs = cryptsetup("luksDump", str(image)).stdout.decode()
    assert "  0: luks2\n" in theirs and "  1: luks2 (unbound)\n" in theirs  # what cryptsetup says
    info = json.loads(run(["dump", str(image), "--json"]).stdout)
    assert [(k["slot"], k["unbound"], k["key_bits"]) for k in info["keyslots"]] == [(0, False, 512), (1, True, 256)]
    text = run(["dump", str(image)]).stdout.decode()
    assert "  0: luks2 key_bits=512" in text and "  1: luks2 (unbound) key_bits=256" in text, text
