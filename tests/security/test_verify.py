"""`scratchfs verify MOUNTPOINT`: exit 0 on a clean mount, 8 naming the corrupted files and blocks."""

from __future__ import annotations

import os
from collections.abc import Callable

from tests.mounting import Mounted, run_cli
from tests.security.helpers import BS, RECORD, put_record, record, write_file, write_new_file

EXIT_CORRUPT = 8


def test_verify_clean_then_corrupt(mount_factory: Callable[..., Mounted]) -> None:
    m = mount_factory("--block-size", str(BS))
    root = m.mountpoint
    (root / "dir" / "deeper").mkdir(parents=True)
    write_file(root / "empty", b"")
    write_file(root / "dir" / "small", b"x" * 100)
    blob_big = write_new_file(m, root / "dir" / "deeper" / "big", os.urandom(6 * BS + 5))
    blob_other = write_new_file(m, root / "other", os.urandom(3 * BS))
    with open(root / "sparse", "wb") as f:
        f.seek(10 * BS)
        f.write(b"tail")
    os.symlink("other", root / "link")

    clean = run_cli("verify", str(root))
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "CORRUPT" not in clean.stdout
    assert "checked 5 file(s): 0 corrupt" in clean.stdout

    put_record(blob_big, 4, bytes(RECORD))
    raw = bytearray(record(blob_other, 0))
    raw[40] ^= 0x80
    put_record(blob_other, 0, bytes(raw))

    bad = run_cli("verify", str(root))
    assert bad.returncode == EXIT_CORRUPT, bad.stdout + bad.stderr
    corrupt = sorted(ln for ln in bad.stdout.splitlines() if ln.startswith("CORRUPT "))
    assert len(corrupt) == 2, bad.stdout
    assert corrupt[0].startswith(f"CORRUPT {root}/dir/deeper/big: 1 bad range(s) at bytes {4 * BS}-{5 * BS - 1}")
    assert corrupt[1].startswith(f"CORRUPT {root}/other: 1 bad range(s) at bytes 0-{BS - 1}")
    assert "checked 5 file(s): 2 corrupt" in bad.stdout
    # The daemon logged each corrupted block by path while verify read through the mount.
    log = m.log_text()
    assert "event=integrity_failure path=/dir/deeper/big" in log and "block=4 " in log
    assert "event=integrity_failure path=/other" in log


def test_verify_refuses_a_directory_that_is_not_a_mount(tmp_path: os.PathLike[str]) -> None:
    r = run_cli("verify", str(tmp_path))
    assert r.returncode == 7
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("scratchfs: ") and "Traceback" not in r.stderr
