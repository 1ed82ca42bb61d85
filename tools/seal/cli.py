"""`scanner-seal`: the customer-side sealer (sealing format v2, HPKE MLKEM768-X25519).

    scanner-seal --appliance-key PUBKEY_FILE --username USER [--kind password|ssh-key]
                 --target ADDR|CIDR|HOST ... --ports SPEC --protocol http-basic|ssh ...
                 [--expires ISO8601|EPOCH] [--allow-cleartext]
                 [--pin-tls-sha256 HEX ...] [--pin-ssh-sha256 HEX ...]  < secret > sealed

Reads the secret (a password, or an SSH private key with --kind ssh-key) from stdin and
seals it, with its scope, to the appliance's hybrid public key (as printed by
`scanner-platform appliance pubkey NAME`), context b"credential". The scope is sealed (the
appliance enforces it) and also copied into the blob's public header (the platform checks
jobs against it). Writes the binary blob to stdout; only the appliance can open it.

A TLS pin means TLS: --allow-cleartext together with --pin-tls-sha256 is refused (the
appliance would never use the credential in clear anyway, since it cannot check a pin there).

Exit codes (tools/seal/exitcodes.py): 0 sealed; 1 cannot write the output; 2 usage error
(bad flags or scope, unreadable or invalid key file, empty or oversized secret, stdout is a
terminal).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn

from protocol import api, credential, scope, sealing
from scratchfs.keyholder.wipe import wipe
from tools.seal.exitcodes import EXIT_FAILURE, EXIT_OK, EXIT_USAGE

PROG = "scanner-seal"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{PROG}: {message}; see '{PROG} --help'\n")


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return code


def _expiry(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--expires {text!r} is neither ISO 8601 nor epoch seconds") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `scanner-seal`; returns the exit code."""
    p = _Parser(prog=PROG, description="Seal a secret (stdin) to an appliance (stdout).")
    p.add_argument(
        "--appliance-key",
        required=True,
        metavar="PUBKEY_FILE",
        help="the appliance's hybrid public key (from 'scanner-platform appliance pubkey')",
    )
    p.add_argument("--username", required=True, help="login name (not secret)")
    p.add_argument("--kind", choices=credential.KINDS, default=credential.KIND_PASSWORD,
                   help="what stdin holds: a password (default) or an SSH private key")
    p.add_argument("--target", action="append", required=True, metavar="ADDR|CIDR|HOST",
                   help="where the credential may be used (repeat); hostnames match the "
                        "addresses they resolve to at scan time")
    p.add_argument("--ports", required=True, metavar="SPEC", help="ports, e.g. 22,443,8443")
    p.add_argument("--protocol", action="append", required=True, choices=scope.PROTOCOLS,
                   help="protocols the credential may be used with (repeat)")
    p.add_argument("--expires", type=_expiry, metavar="WHEN",
                   help="not used after this time (ISO 8601, UTC if no zone, or epoch seconds)")
    p.add_argument("--allow-cleartext", action="store_true",
                   help="allow HTTP Basic without TLS (default: TLS only); not with "
                        "--pin-tls-sha256")
    p.add_argument("--pin-tls-sha256", action="append", default=[], metavar="HEX",
                   help="only send over TLS to a certificate with this SHA-256 (repeat)")
    p.add_argument("--pin-ssh-sha256", action="append", default=[], metavar="HEX",
                   help="only send over SSH to a host key with this SHA-256 (repeat)")
    p.add_argument("--force", action="store_true", help="write binary output to a terminal")
    args = p.parse_args(argv)
    if args.allow_cleartext and args.pin_tls_sha256:
        # The appliance would honour the pin and never send in clear (protocol.scope's
        # Scope.sends_cleartext); refusing says so now instead of sealing a dead flag.
        return _fail(
            "--allow-cleartext contradicts --pin-tls-sha256 (a pinned certificate is only "
            "checked over TLS, so the credential never travels in clear); drop one of them",
            EXIT_USAGE,
        )
    try:
        key_data = Path(args.appliance_key).read_bytes()
    except OSError as e:
        return _fail(f"cannot read {args.appliance_key}: {e.strerror}; check the path", EXIT_USAGE)
    try:
        public = sealing.load_hybrid_public_key(key_data)
    except sealing.SealError as e:
        return _fail(f"{args.appliance_key}: {e}; use 'scanner-platform appliance pubkey NAME'", EXIT_USAGE)
    try:
        credential.validate_username(args.username)
        sc = scope.Scope.build(
            args.target, args.ports, args.protocol, args.expires, args.allow_cleartext,
            args.pin_tls_sha256, args.pin_ssh_sha256,
        )  # fmt: skip
    except (scope.ScopeError, credential.CredentialError) as e:
        return _fail(f"{e}; fix the flag", EXIT_USAGE)
    if args.kind == credential.KIND_SSH_KEY and scope.PROTO_HTTP_BASIC in sc.protocols:
        return _fail("an SSH key cannot be used for http-basic; drop --protocol http-basic", EXIT_USAGE)
    meta = credential.Metadata(args.kind, args.username, sc)
    if sys.stdout.isatty() and not args.force:
        return _fail("refusing to write binary to a terminal; redirect stdout to a file", EXIT_USAGE)
    secret = bytearray(sys.stdin.buffer.read(sealing.MAX_PLAINTEXT + 1))
    plaintext = bytearray()
    try:
        if args.kind == credential.KIND_PASSWORD:
            # A password piped with `echo` ends in a newline that is not part of it.
            while secret and secret[-1] in (0x0A, 0x0D):
                secret.pop()
        if not secret:
            return _fail("no secret on stdin; pipe the credential in", EXIT_USAGE)
        if len(secret) > sealing.MAX_PLAINTEXT - 4096:
            return _fail(f"secret larger than {sealing.MAX_PLAINTEXT - 4096} bytes", EXIT_USAGE)
        plaintext = credential.pack(meta, secret)
        blob = sealing.seal_v2(public, plaintext, api.SEAL_CONTEXT_CREDENTIAL, sc.to_bytes())
    except sealing.SealError as e:
        return _fail(f"{e}; check the key file", EXIT_USAGE)
    finally:
        wipe(secret)
        wipe(plaintext)
    try:
        sys.stdout.buffer.write(blob)
        sys.stdout.buffer.flush()
    except OSError as e:
        return _fail(f"cannot write the sealed output: {e.strerror}", EXIT_FAILURE)
    return EXIT_OK
