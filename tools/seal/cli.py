"""`scanner-seal --appliance-key PUBKEY_FILE < secret > sealed`: the customer-side sealer.

Reads the secret from stdin, seals it to the appliance's X25519 public key (as printed by
`scanner-platform appliance pubkey NAME`) with protocol.sealing (context b"credential"), and
writes the binary sealed blob to stdout. The platform stores the blob; only the appliance
can open it.

Exit codes: 0 sealed; 1 cannot write the output; 2 usage error (bad flags, unreadable or
invalid key file, empty or oversized secret, stdout is a terminal).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from protocol import api, sealing
from scratchfs.keyholder.wipe import wipe

PROG = "scanner-seal"
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{PROG}: {message}; see '{PROG} --help'\n")


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `scanner-seal`; returns the exit code."""
    p = _Parser(prog=PROG, description="Seal a secret (stdin) to an appliance (stdout).")
    p.add_argument(
        "--appliance-key",
        required=True,
        metavar="PUBKEY_FILE",
        help="the appliance's X25519 public key (PEM from 'appliance pubkey')",
    )
    p.add_argument("--force", action="store_true", help="write binary output to a terminal")
    args = p.parse_args(argv)
    try:
        key_data = Path(args.appliance_key).read_bytes()
    except OSError as e:
        return _fail(f"cannot read {args.appliance_key}: {e.strerror}; check the path", EXIT_USAGE)
    try:
        public = sealing.load_public_key(key_data)
    except sealing.SealError as e:
        return _fail(f"{args.appliance_key}: {e}; use 'scanner-platform appliance pubkey NAME'", EXIT_USAGE)
    if sys.stdout.isatty() and not args.force:
        return _fail("refusing to write binary to a terminal; redirect stdout to a file", EXIT_USAGE)
    secret = bytearray(sys.stdin.buffer.read(sealing.MAX_PLAINTEXT + 1))
    try:
        if not secret:
            return _fail("no secret on stdin; pipe the credential in", EXIT_USAGE)
        if len(secret) > sealing.MAX_PLAINTEXT:
            return _fail(f"secret larger than {sealing.MAX_PLAINTEXT} bytes", EXIT_USAGE)
        blob = sealing.seal(public, secret, api.SEAL_CONTEXT_CREDENTIAL)
    except sealing.SealError as e:
        return _fail(f"{e}; check the key file", EXIT_USAGE)
    finally:
        wipe(secret)
    try:
        sys.stdout.buffer.write(blob)
        sys.stdout.buffer.flush()
    except OSError as e:
        return _fail(f"cannot write the sealed output: {e.strerror}", EXIT_FAILURE)
    return EXIT_OK
