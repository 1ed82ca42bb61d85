"""`scratchfs volume ...`: format, open, close, erase, dump (and rekey) LUKS2 volumes.

Keys are read only from a file descriptor (``--key-fd FD``: a pipe, or 0 for stdin), all of it
up to EOF, as raw bytes. Errors are one line on stderr; exit codes are in docs/volume.md
(declared in scratchfs/exitcodes.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scratchfs.exitcodes import EXIT_INTERRUPTED, EXIT_VOLUME_INTERNAL
from scratchfs.keyholder import logformat
from scratchfs.keyholder.wipe import wipe
from scratchfs.volume import api
from scratchfs.volume.errors import KeyInputError, VolumeError
from scratchfs.volume.state import DEFAULT_RUN_DIR

PROG = "scratchfs"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'64M', '1G', '512K', '1048576' (binary units; optional 'iB'/'B') -> bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (use e.g. 64M or 1G)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def read_passphrase_fd(fd: int) -> bytearray:
    """Read the whole keyslot passphrase from *fd* (until EOF) into a bytearray the caller wipes."""
    passphrase = bytearray()
    try:
        while len(passphrase) <= api.MAX_PASSPHRASE_SIZE:
            chunk = os.read(fd, api.MAX_PASSPHRASE_SIZE + 1 - len(passphrase))
            if not chunk:
                break
            passphrase += chunk
    except OSError as e:
        raise KeyInputError(
            f"cannot read the key from fd {fd} ({e.strerror}); pass an open pipe with --key-fd"
        ) from None
    finally:
        if fd > 2:
            try:
                os.close(fd)
            except OSError:
                pass
    if not passphrase:
        raise KeyInputError(f"no key on fd {fd} (empty); write the key to the pipe, then close it")
    if len(passphrase) > api.MAX_PASSPHRASE_SIZE:
        wipe(passphrase)
        raise KeyInputError(f"the key on fd {fd} is longer than {api.MAX_PASSPHRASE_SIZE} bytes; pass the raw key only")
    return passphrase


def cmd_format(args: argparse.Namespace) -> int:
    passphrase = read_passphrase_fd(args.key_fd)
    try:
        api.format_volume(
            Path(args.image),
            args.size,
            passphrase,
            backend=args.backend,
            sector_size=args.sector_size,
            run_dir=args.run_dir,
        )
    finally:
        wipe(passphrase)
    print(
        f"formatted {args.image}: {args.size} bytes, LUKS2 aes-xts-plain64, "
        f"{args.sector_size}-byte sectors, ext4 inside"
    )
    return 0


def cmd_open(args: argparse.Namespace) -> int:
    passphrase = read_passphrase_fd(args.key_fd)
    try:
        vol = api.open_volume(
            Path(args.image),
            Path(args.mountpoint),
            passphrase,
            args.backend,
            run_dir=args.run_dir,
            debug=bool(getattr(args, "debug", False)),
        )
    finally:
        wipe(passphrase)
    print(f"opened {args.image} on {vol.mountpoint} (backend {vol.backend})")
    return 0


def cmd_close(args: argparse.Namespace) -> int:
    api.close_volume(Path(args.mountpoint), run_dir=args.run_dir)
    return 0


def cmd_erase(args: argparse.Namespace) -> int:
    api.erase_volume(Path(args.image))
    print(f"erased {args.image}: every keyslot destroyed, the data is unrecoverable")
    return 0


def cmd_rekey(args: argparse.Namespace) -> int:
    if args.key_fd == args.new_key_fd:
        raise KeyInputError("--key-fd and --new-key-fd must be different descriptors")
    old = read_passphrase_fd(args.key_fd)
    try:
        new = read_passphrase_fd(args.new_key_fd)
        try:
            api.change_passphrase(Path(args.image), old, new)
        finally:
            wipe(new)
    finally:
        wipe(old)
    print(f"rekeyed {args.image}")
    return 0


def format_dump(info: dict[str, Any]) -> str:
    """Human-readable header summary."""
    lines = [
        f"{k}: {info[k]}"
        for k in (
            "image",
            "image_size",
            "format",
            "uuid",
            "label",
            "cipher",
            "volume_key_bits",
            "sector_size",
            "data_offset",
            "data_size",
            "iv_offset",
            "metadata_size",
            "keyslots_size",
            "erased",
            "userspace_supported",
        )
    ]
    lines.append(f"keyslots: {len(info['keyslots'])}")
    for ks in info["keyslots"]:
        # As cryptsetup luksDump: "1: luks2 (unbound)" for a keyslot that opens no segment.
        kind = f"{ks['type']} (unbound)" if ks["unbound"] else str(ks["type"])
        extra = " ".join(f"{k}={v}" for k, v in ks.items() if k not in ("slot", "type", "unbound"))
        lines.append(f"  {ks['slot']}: {kind} {extra}")
    return "\n".join(lines)


def cmd_dump(args: argparse.Namespace) -> int:
    info = api.dump_volume(Path(args.image))
    print(json.dumps(info, indent=2) if args.json else format_dump(info))
    return 0


def _guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn every error into one line on stderr and a documented exit code."""

    def run(args: argparse.Namespace) -> int:
        debug = bool(getattr(args, "debug", False))
        try:
            return fn(args)
        except VolumeError as e:
            if debug:
                traceback.print_exc()
            print(f"{PROG}: {e}", file=sys.stderr)
            return e.exit_code
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted; run the command again", file=sys.stderr)
            return EXIT_INTERRUPTED
        except Exception as e:  # noqa: BLE001 - the CLI's last line of defence
            if debug:
                traceback.print_exc()
            print(
                f"{PROG}: internal error ({type(e).__name__}: {e}); rerun with --debug and report it", file=sys.stderr
            )
            return EXIT_VOLUME_INTERNAL

    run.__name__ = fn.__name__
    return run


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks and debug logs")
    p.add_argument(
        "--run-dir",
        type=Path,
        default=DEFAULT_RUN_DIR,
        help=f"state directory of open volumes (default {DEFAULT_RUN_DIR})",
    )


def _key_fd(p: argparse.ArgumentParser, flag: str = "--key-fd", dest: str = "key_fd") -> None:
    p.add_argument(
        flag,
        dest=dest,
        type=int,
        required=True,
        metavar="FD",
        help="read the key (raw bytes, until EOF) from this file descriptor",
    )


def register(subparsers: Any) -> None:
    """Add format/open/close/erase/dump/rekey sub-commands to an argparse subparsers object."""
    p = subparsers.add_parser("format", help="create a LUKS2 image with ext4 inside")
    p.add_argument("image", help="image file to create (must not exist)")
    p.add_argument("--size", type=parse_size, required=True, help="image size, e.g. 64M, 2G")
    _key_fd(p)
    p.add_argument("--backend", choices=api.BACKENDS, default="auto")
    p.add_argument(
        "--sector-size",
        type=int,
        choices=(512, 1024, 2048, 4096),
        default=api.DEFAULT_SECTOR_SIZE,
        help="encryption sector size (default 4096)",
    )
    _common(p)
    p.set_defaults(func=_guard(cmd_format))

    p = subparsers.add_parser("open", help="unlock an image and mount its ext4 filesystem")
    p.add_argument("image")
    p.add_argument("mountpoint")
    _key_fd(p)
    p.add_argument("--backend", choices=api.BACKENDS, default="auto")
    _common(p)
    p.set_defaults(func=_guard(cmd_open))

    p = subparsers.add_parser("close", help="unmount and lock a volume opened by 'open'")
    p.add_argument("mountpoint")
    _common(p)
    p.set_defaults(func=_guard(cmd_close))

    p = subparsers.add_parser("erase", help="destroy every keyslot (data unrecoverable)")
    p.add_argument("image")
    _common(p)
    p.set_defaults(func=_guard(cmd_erase))

    p = subparsers.add_parser("dump", help="print the header summary (never a key or passphrase)")
    p.add_argument("image")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _common(p)
    p.set_defaults(func=_guard(cmd_dump))

    p = subparsers.add_parser("rekey", help="replace the keyslot passphrase (the platform rotates its key)")
    p.add_argument("image")
    _key_fd(p)
    _key_fd(p, "--new-key-fd", "new_key_fd")
    _common(p)
    p.set_defaults(func=_guard(cmd_rekey))


def build_parser() -> argparse.ArgumentParser:
    """The stand-alone parser of `python -m scratchfs.volume`."""
    parser = argparse.ArgumentParser(prog=f"{PROG} volume", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one volume command; returns the exit code."""
    args = build_parser().parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    logformat.setup(logging.DEBUG if debug else logging.WARNING)
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)
