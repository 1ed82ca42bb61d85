"""`scanner-platform` commands about an appliance's identity and keys: volume-key rotation,
clone quarantine and its sessions, the attested PCR baseline, and the trusted EK CAs.

`cli` builds the parser and maps errors to exit codes (`exitcodes`); these commands raise
`cliargs.CliError` or the storage errors `cli.main` turns into one line each.
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path
from typing import Any

from tools.platform import attestation, cliargs, db, exitcodes, keys, state, views


def cmd_appliance_rotate_volume_key(args: argparse.Namespace) -> int:
    paths = cliargs.state_paths(args)
    with cliargs.storage(args) as storage:
        kek = state.load_kek(paths)
        epoch, created = storage.rotate_volume_key(args.name, time.time(), functools.partial(keys.wrap_new_share, kek))
    if created:
        print(
            f"appliance {args.name}: volume key epoch {epoch} pending; its next boot re-keys the volume to it "
            "and the platform then destroys the old share (see 'appliance list')"
        )
    else:
        print(f"appliance {args.name}: volume key epoch {epoch} is pending already; its next boot completes it")
    return exitcodes.OK


def cmd_appliance_clear(args: argparse.Namespace) -> int:
    keep = db.CLEAR_NEXT_BOOT if args.next_boot else args.keep  # None: the current session
    with cliargs.storage(args) as storage:
        reason, kept = storage.clear_quarantine(args.name, time.time(), keep)
    if kept is not None:
        decision = f"kept boot session {kept.public_id or '(current)'} (boot counter {kept.boot_counter})"
    else:
        decision = "no session kept: the next boot (attested, if the TPM is enrolled) sets the counter baseline"
    print(f"appliance {args.name} released from quarantine (was: {reason}); {decision}; every other session ended")
    return exitcodes.OK


def cmd_appliance_sessions(args: argparse.Namespace) -> int:
    with cliargs.storage(args) as storage:
        rows = storage.sessions(args.name)
    print(views.sessions_table(rows))
    return exitcodes.OK


def cmd_appliance_baseline(args: argparse.Namespace) -> int:
    with cliargs.storage(args) as storage:
        app = storage.appliance(args.name)
        rec = storage.attestation(app.id)
        if rec is None or rec.state != db.ATTEST_ATTESTED or rec.pcr_values is None:
            raise cliargs.CliError(f"appliance {args.name} has no attested TPM, so no PCR baseline", exitcodes.STATE)
        print(views.baseline_table(args.name, rec))
        pending = rec.pending_pcr_values
        if not args.accept:
            if pending:
                print(f"to accept the refused values: scanner-platform appliance baseline {args.name} --accept")
            return exitcodes.OK
        if not pending:
            raise cliargs.CliError(f"appliance {args.name} has no refused quote to accept", exitcodes.CONFLICT)
        digest = attestation.pcr_digest([bytes.fromhex(v) for v in pending])
        try:
            storage.accept_pcr_baseline(app.id, pending, digest, time.time())
        except ValueError as e:
            raise cliargs.CliError(f"{e}; run the command again to see the values", exitcodes.CONFLICT) from None
    print(f"appliance {args.name}: new PCR baseline accepted (digest {digest.hex()})")
    return exitcodes.OK


def read_ek_ca(file: str) -> str:
    """The PEM bundle in *file*, checked to hold EK CA certificates (CliError otherwise)."""
    try:
        text = Path(file).read_text("ascii")
        attestation.load_ek_cas(text.encode())
    except (OSError, UnicodeDecodeError) as e:
        raise cliargs.CliError(f"cannot read EK CA file {file}: {e}; pass a PEM bundle", exitcodes.USAGE) from None
    except ValueError as e:
        raise cliargs.CliError(f"{file} {e}; pass the TPM manufacturers' CA certificates", exitcodes.USAGE) from None
    return text


def cmd_ek_ca_set(args: argparse.Namespace) -> int:
    bundle = read_ek_ca(args.file)
    with cliargs.storage(args) as storage:
        storage.set_setting(db.SETTING_EK_CA, bundle)
    print(f"trusted EK CAs set from {args.file}: TPMs with EK certificates they issued can be attested")
    return exitcodes.OK


def cmd_ek_ca_show(args: argparse.Namespace) -> int:
    with cliargs.storage(args) as storage:
        value = storage.get_setting(db.SETTING_EK_CA)
    if not isinstance(value, str):
        print("none (no TPM can be attested)")
    else:
        for cert in attestation.load_ek_cas(value.encode()):
            print(f"{cert.subject.rfc4514_string()}  (until {cert.not_valid_after_utc:%Y-%m-%d})")
    return exitcodes.OK


def cmd_ek_ca_clear(args: argparse.Namespace) -> int:
    with cliargs.storage(args) as storage:
        storage.delete_setting(db.SETTING_EK_CA)
    print("trusted EK CAs cleared: no new TPM can be enrolled (enrolled ones stay attested)")
    return exitcodes.OK


# --- parser -----------------------------------------------------------------------------


def add_rotate_volume_key(asub: Any) -> None:
    """``appliance rotate-volume-key`` under the ``appliance`` subcommands *asub*."""
    sp = cliargs.leaf(
        asub,
        "rotate-volume-key",
        cmd_appliance_rotate_volume_key,
        "new volume key epoch: the next boot re-keys the volume, then the old share is destroyed",
    )
    sp.add_argument("name", type=cliargs.name)


def add_commands(sub: Any, asub: Any) -> None:
    """``appliance clear|sessions|baseline`` under *asub* and the ``ek-ca`` group under *sub*."""
    sp = cliargs.leaf(
        asub, "clear", cmd_appliance_clear,
        "lift a clone quarantine (after stopping any copy): say which boot is legitimate; every other session ends",
    )  # fmt: skip
    sp.add_argument("name", type=cliargs.name)
    decision = sp.add_mutually_exclusive_group()
    decision.add_argument(
        "--keep", metavar="SESSION", help="the legitimate session (see 'appliance sessions'); default: the current one"
    )
    decision.add_argument(
        "--next-boot", action="store_true", help="keep no session: the next (attested) boot sets the counter baseline"
    )
    sp = cliargs.leaf(
        asub, "sessions", cmd_appliance_sessions, "list an appliance's kept boot sessions (for 'clear --keep')"
    )
    sp.add_argument("name", type=cliargs.name)
    sp = cliargs.leaf(
        asub, "baseline", cmd_appliance_baseline,
        "show an attested appliance's PCR baseline and the last refused quote; --accept makes that the baseline",
    )  # fmt: skip
    sp.add_argument("name", type=cliargs.name)
    sp.add_argument("--accept", action="store_true", help="accept the last refused quote's PCR values")

    eksub = cliargs.group(sub, "ek-ca", "TPM manufacturers' CAs trusted for attestation (EK certificates)")
    sp = cliargs.leaf(eksub, "set", cmd_ek_ca_set, "trust the EK CAs of a PEM bundle (replaces the current ones)")
    sp.add_argument("file", metavar="FILE")
    cliargs.leaf(eksub, "show", cmd_ek_ca_show, "show the trusted EK CAs")
    cliargs.leaf(eksub, "clear", cmd_ek_ca_clear, "trust no EK CA (no new enrollments)")
