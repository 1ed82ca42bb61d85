"""`scratchfs verify MOUNTPOINT`: exit 0 on a clean mount, 8 naming the corrupted files and blocks."""

from __future__ import annotations

import io
import os
from collections.abc import Callable

from scratchfs.verify import verify_tree
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


def test_verify_skips_known_holes_and_reads_planted_data(mount_factory: Callable[..., Mounted]) -> None:
    """Issue 11: verify on a large sparse tree ran 600 s without output. It must read only what
    was written (or what the backing store holds), report progress, and still catch ciphertext
    planted in a hole."""
    m = mount_factory("--block-size", str(BS))
    root = m.mountpoint
    far = 1 << 40  # the blob's records sit at ~2^40 too: sparse on the ext4 backing
    big = root / "sparse-big"
    blob = write_new_file(m, big, b"head" * 1000)
    with open(big, "r+b") as f:
        f.seek(far)
        f.write(b"far data")
    os.truncate(root / "sparse-big", 1 << 43)  # 8 TiB of size, two blocks of data
    for i in range(20):
        with open(root / f"t{i}", "wb") as f:
            f.truncate(1 << 36)  # 64 GiB holes, no blob
            f.write(b"x")

    out, progress = io.StringIO(), io.StringIO()
    code = verify_tree(root, out, progress_out=progress, progress_every=0.0)
    assert code == 0, out.getvalue()
    assert "checked 21 file(s): 0 corrupt" in out.getvalue()
    read = int(out.getvalue().split(" bytes read")[0].rsplit(" ", 1)[1])
    # 22 written blocks; the backing store's SEEK_DATA answers in 4 KiB pages, which may add the
    # block whose record shares a page with a written one.
    assert read <= 2 * 22 * BS, f"verify read {read} bytes of a tree holding 22 blocks of data"
    assert progress.getvalue().startswith("progress: "), "no progress line"

    # Ciphertext-like bytes planted in a hole of the blob (block 1000: never written) are read and caught.
    put_record(blob, 1000, os.urandom(RECORD))
    out = io.StringIO()
    assert verify_tree(root, out) == EXIT_CORRUPT
    assert f"CORRUPT {big}: 1 bad range(s) at bytes {1000 * BS}-{1001 * BS - 1}" in out.getvalue()
    assert "data found where a hole must be" in m.log_text()
