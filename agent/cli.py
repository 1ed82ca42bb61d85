"""``scanner-agent``: activate an appliance, or run it.

    scanner-agent activate STATE_DIR --platform URL --ca CA_FILE --code CODE
                  [--keystore tpm|file] [--tcti TCTI] [--tpm-pcrs 7[,..]]
                  [--proxy http://HOST:PORT [--proxy-auth-fd FD]]
    scanner-agent run STATE_DIR [--once] [--tcti TCTI]
    scanner-agent migrate-keystore STATE_DIR [--tcti TCTI] [--tpm-pcrs 7[,..]]
    scanner-agent attest STATE_DIR [--tcti TCTI]

Exit codes (agent/exitcodes.py, docs/agent.md): 0 ok, 2 usage, 20 state, 21 tampered state, 22 platform/TLS,
23 activation refused, 24 deactivated (keyslots erased), 25 volume, 26 scratchfs,
27 time sync, 28 internal error, 29 keystore/TPM, 30 PCR mismatch, 31 quarantined,
32 attestation refused.
Every error is one line on stderr; --debug adds a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import NoReturn

import trio

from agent import keystore as ksmod
from agent import state as statemod
from agent import timesync
from agent.attest import AttestationUnavailable
from agent.attest_platform import enroll
from agent.boot_report import report_mismatch
from agent.errors import (
    ActivationError,
    AgentError,
    KeystoreError,
    PcrMismatchError,
)
from agent.exitcodes import EXIT_ATTESTATION, EXIT_INTERNAL, EXIT_OK, EXIT_USAGE
from agent.jobs import JobSettings
from agent.keystore.migrate import migrate_to_tpm
from agent.keystore.tpm import parse_pcrs
from agent.lifecycle import Agent, RunSettings, platform_client_for, platform_error
from agent.scan.model import ScanOptions
from agent.tls import client_context
from protocol import api, sealing
from protocol.client import PlatformClient, PlatformError, new_client_key_and_csr
from protocol.proxy import ProxyConfig
from protocol.sealing import generate_hybrid_keypair, generate_keypair
from scratchfs.keyholder import logformat
from scratchfs.keyholder.hardening import harden_process
from scratchfs.keyholder.wipe import wipe

PROG = "scanner-agent"


class UsageError(Exception):
    """Bad command-line input (exit 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}; see '{PROG} --help'")


def _size(text: str) -> int:
    units = {"K": 1024, "M": 1024**2, "G": 1024**3}
    mult = units.get(text[-1:].upper(), 1)
    number = text[:-1] if text[-1:].upper() in units else text
    try:
        return int(number) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (e.g. 256M)") from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    p = _Parser(prog=PROG, description="the scanning appliance's agent")
    p.add_argument("--debug", action="store_true", help="debug logs and tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    a = sub.add_parser("activate", help="activate this appliance with its platform (once)")
    a.add_argument("state_dir", type=Path, metavar="STATE_DIR")
    a.add_argument("--platform", required=True, metavar="URL", help="https://HOST[:PORT]")
    a.add_argument("--ca", required=True, type=Path, metavar="CA_FILE",
                   help="the platform's root CA certificate (PEM)")
    a.add_argument("--code", required=True, metavar="CODE",
                   help="one-time activation code ('-' reads it from stdin)")
    a.add_argument("--keystore", choices=(ksmod.KIND_TPM, ksmod.KIND_FILE), default=None,
                   help="where the private keys live: tpm (default; needs /dev/tpmrm0 or --tcti) "
                        "or file (clear files: a copy of the disk can act as the appliance)")
    a.add_argument("--tcti", metavar="TCTI",
                   help="TPM to use, tpm2-tools syntax (default device:/dev/tpmrm0)")
    a.add_argument("--tpm-pcrs", metavar="PCRS",
                   help="seal the keys to these SHA-256 PCRs' current values, e.g. 7 or 0,2,7")
    a.add_argument("--proxy", metavar="URL",
                   help="HTTP CONNECT proxy http://HOST:PORT for every platform and syslog "
                        "connection (fixed at activation)")
    a.add_argument("--proxy-auth-fd", type=int, metavar="FD",
                   help="read the proxy's user:password from this file descriptor "
                        "(never from argv); kept in the keystore like the private keys")

    k = sub.add_parser("seal-key", help="manage the sealing key")
    ksub = k.add_subparsers(dest="seal_command", required=True, parser_class=_Parser)
    u = ksub.add_parser(
        "upgrade",
        help="add a hybrid (ML-KEM-768 + X25519) sealing key and tell the platform (sealing v2)",
    )
    u.add_argument("state_dir", type=Path, metavar="STATE_DIR")

    r = sub.add_parser("run", help="boot, unlock, run jobs, shut down")
    r.add_argument("state_dir", type=Path, metavar="STATE_DIR")
    r.add_argument("--once", action="store_true", help="stop after one job")
    r.add_argument("--poll-wait", type=float, default=30.0, help="long-poll seconds")
    r.add_argument("--volume-size", type=_size, default=256 * 1024 * 1024,
                   help="size of the volume created at first boot (default 256M)")
    r.add_argument("--backend", choices=("auto", "dmcrypt", "userspace"), default="auto")
    r.add_argument("--concurrency", type=int, default=ScanOptions.concurrency)
    r.add_argument("--connect-timeout", type=float, default=ScanOptions.connect_timeout)
    r.add_argument("--banner-timeout", type=float, default=ScanOptions.banner_timeout)
    r.add_argument("--upload-backoff-max", type=float, default=30.0)
    r.add_argument("--tcti", metavar="TCTI",
                   help="TPM to use instead of the one recorded at activation (device renamed)")

    m = sub.add_parser("migrate-keystore",
                       help="move a file-keystore appliance's keys into the TPM (agent stopped)")
    m.add_argument("state_dir", type=Path, metavar="STATE_DIR")
    m.add_argument("--tcti", metavar="TCTI",
                   help="TPM to use, tpm2-tools syntax (default device:/dev/tpmrm0)")
    m.add_argument("--tpm-pcrs", metavar="PCRS",
                   help="seal the keys to these SHA-256 PCRs' current values, e.g. 7 or 0,2,7")

    t = sub.add_parser("attest", help="enroll this appliance's TPM with the platform (activation "
                                      "and migration do it; this retries it)")
    t.add_argument("state_dir", type=Path, metavar="STATE_DIR")
    t.add_argument("--tcti", metavar="TCTI",
                   help="TPM to use instead of the one recorded at activation (device renamed)")
    return p


def setup_logging(debug: bool, clock: timesync.Clock) -> None:
    """Local logs to stderr in the one format, timestamps in platform-synced UTC."""
    logformat.setup(logging.DEBUG if debug else logging.INFO, offset=lambda: clock.offset)


def choose_keystore(state_dir: Path, kind: str | None, tcti: str | None,
                    pcrs_text: str | None) -> ksmod.Keystore:
    """The keystore for a new activation: the TPM unless ``file`` is asked for explicitly."""
    pcrs = parse_pcrs(pcrs_text) if pcrs_text else ()
    if kind is None:
        kind = ksmod.KIND_TPM
        if tcti is None and ksmod.default_tcti() is None:
            raise KeystoreError(
                f"no TPM found ({ksmod.DEFAULT_TPM_DEVICE} is missing) and no --tcti given",
                "pass --tcti for the TPM, or --keystore file to accept private keys in clear "
                "files (a copy of the disk can then act as this appliance)",
            )
    if kind == ksmod.KIND_FILE and tcti is not None:
        raise UsageError("--tcti needs --keystore tpm; drop one of them")
    return ksmod.create_keystore(state_dir, kind, tcti or ksmod.default_tcti(), pcrs)


async def activate(state_dir: Path, url: str, ca_pem: bytes, code: str,
                   keystore: ksmod.Keystore, proxy: ProxyConfig | None = None) -> str:
    """Activate with the platform and write the bound state dir; return the appliance name.

    With *proxy*, activation itself already goes through it (no direct connection).
    """
    try:
        endpoint = statemod.PlatformEndpoint.parse(url)
    except ValueError as e:
        raise UsageError(f"{e}; give --platform https://HOST[:PORT]") from None
    clock = timesync.Clock()
    try:
        anon = PlatformClient(endpoint.url, client_context(ca_pem, clock), proxy=proxy)
    except (ValueError, UnicodeDecodeError):
        raise UsageError(
            "the CA file does not hold a PEM certificate; give the platform's CA"
        ) from None
    try:
        await timesync.sync(anon.time, clock)
        pem, csr_pem = new_client_key_and_csr("scanner-appliance")
        key_pem = bytearray(pem)
        del pem
        private, seal_public = generate_keypair()
        seal_private = bytearray(private)
        del private
        hybrid_private, hybrid_public = generate_hybrid_keypair()  # already a bytearray
        result = await anon.activate(code, csr_pem, seal_public, hybrid_public)
    except PlatformError as e:
        if e.reason in (api.REASON_INVALID_CODE, api.REASON_CODE_EXPIRED):
            raise ActivationError(
                f"the platform refused the activation code ({e.reason})"
            ) from None
        raise platform_error(e, "activation") from None
    try:
        statemod.write_state(
            state_dir, endpoint, result.appliance, ca_pem, result.certificate_pem, key_pem,
            seal_private, clock.now(), keystore, hybrid_private, proxy,
        )
    finally:
        wipe(key_pem)
        wipe(seal_private)
        wipe(hybrid_private)
    statemod.load_state(state_dir).forget()  # prove the state we wrote verifies
    return result.appliance


def _read_code(value: str) -> str:
    code = sys.stdin.readline().strip() if value == "-" else value
    if not code:
        raise UsageError("empty activation code; pass --code CODE or --code - with it on stdin")
    return code


def _read_proxy_credentials(fd: int) -> bytearray:
    """user:password from an inherited descriptor: secrets never travel in argv or env.

    Read straight into one bytearray (readv), so no unwipeable copy of the password is made.
    """
    buf = bytearray(statemod.MAX_PROXY_CREDENTIALS + 1)
    got = 0
    try:
        with memoryview(buf) as view:
            while got < len(buf):
                n = os.readv(fd, [view[got:]])
                if n == 0:
                    break
                got += n
    except OSError as e:
        wipe(buf)
        raise UsageError(
            f"cannot read proxy credentials from fd {fd}: {e.strerror}; "
            "pass an open descriptor to --proxy-auth-fd"
        ) from None
    finally:
        if fd != 0:
            os.close(fd)
    if got > statemod.MAX_PROXY_CREDENTIALS:
        wipe(buf)
        raise UsageError("proxy credentials are too long; give user:password on one line")
    while got and buf[got - 1] in b"\r\n":
        got -= 1
    buf[got:] = bytes(len(buf) - got)  # the stripped newline (and spare room), zeroed
    del buf[got:]  # in place: a stripped copy could not be wiped
    return buf


def _proxy_from_args(args: argparse.Namespace) -> ProxyConfig | None:
    if args.proxy is None:
        if args.proxy_auth_fd is not None:
            raise UsageError("--proxy-auth-fd needs --proxy; give the proxy URL too")
        return None
    credentials = None
    if args.proxy_auth_fd is not None:
        if args.proxy_auth_fd == 0 and args.code == "-":
            raise UsageError(
                "--code - and --proxy-auth-fd 0 both read stdin; pass the credentials on another fd"
            )
        credentials = _read_proxy_credentials(args.proxy_auth_fd)
    try:
        return ProxyConfig.parse(args.proxy, credentials)
    except ValueError as e:
        if credentials is not None:
            wipe(credentials)
        hint = "pass user:password on --proxy-auth-fd" if "credentials" in str(e) else \
            "give --proxy http://HOST:PORT"
        raise UsageError(f"{e}; {hint}") from None


def cmd_activate(args: argparse.Namespace) -> int:
    """``scanner-agent activate``."""
    try:
        ca_pem = args.ca.read_bytes()
    except OSError as e:
        raise UsageError(
            f"cannot read CA file {args.ca}: {e.strerror}; give a readable PEM file"
        ) from None
    # Hardened before the proxy's password enters this process (no core dump, locked memory).
    harden_process()
    proxy = _proxy_from_args(args)
    code = _read_code(args.code)
    ksmod.quiet_tss_logging()
    state_dir = args.state_dir.absolute()
    if state_dir.exists() and (not state_dir.is_dir() or any(state_dir.iterdir())):
        raise ActivationError(
            f"state dir {state_dir} is not empty (already activated?)",
            "activate into an empty or new directory",
        )
    try:
        keystore = choose_keystore(state_dir, args.keystore, args.tcti, args.tpm_pcrs)
        try:
            name = trio.run(activate, state_dir, args.platform, ca_pem, code, keystore, proxy)
        except BaseException:
            keystore.discard()
            raise
        keystore.close()
    finally:
        if proxy is not None and isinstance(proxy.credentials, bytearray):
            wipe(proxy.credentials)  # read into a bytearray by _read_proxy_credentials
    label = keystore.kind
    if keystore.kind == ksmod.KIND_TPM:
        label = f"tpm keystore ({attest_state(state_dir, args.tcti)})"
    else:
        label = "file keystore (unattested)"
    print(f"activated appliance {name} with the {label}; state in {args.state_dir}")
    return EXIT_OK


async def _enroll(state: statemod.AgentState) -> str:
    clock = timesync.Clock()
    try:
        await timesync.sync(platform_client_for(state, clock, mutual=False).time, clock)
        client = platform_client_for(state, clock, mutual=True)
        try:
            return await enroll(client, state)
        finally:
            await client.aclose()
    except PlatformError as e:
        if e.reason == api.REASON_ATTESTATION_UNAVAILABLE:
            raise AttestationUnavailable(
                "the platform trusts no EK CA, so it cannot verify TPMs",
                "the operator configures one with 'scanner-platform ek-ca set FILE'",
            ) from None
        raise platform_error(e, "attestation") from None


def attest_state(state_dir: Path, tcti: str | None) -> str:
    """Enroll an activated TPM appliance with its platform; return what to show (attested or
    why not). An unattestable TPM (no EK certificate, platform without EK CAs) is not an
    error: the appliance runs unattested. A refusal raises AttestationRefused (exit 32)."""
    state = statemod.load_state(state_dir, tcti)
    try:
        return trio.run(_enroll, state)
    except AttestationUnavailable as e:
        return f"unattested: {e.message}"
    finally:
        state.forget()


def cmd_attest(args: argparse.Namespace) -> int:
    """``scanner-agent attest``: (re)try enrolling the TPM with the platform."""
    harden_process()
    ksmod.quiet_tss_logging()
    root = args.state_dir.absolute()
    state = statemod.load_state(root, args.tcti)
    kind = state.keystore.kind
    state.forget()
    if kind != ksmod.KIND_TPM:
        raise KeystoreError(
            f"{root} uses the {kind} keystore: there is no TPM to attest",
            "move the keys into the TPM with 'scanner-agent migrate-keystore' (it attests too)",
        )
    verdict = attest_state(root, args.tcti)
    print(f"appliance TPM: {verdict}")
    return EXIT_OK if not verdict.startswith("unattested") else EXIT_ATTESTATION


async def upgrade_seal_key(state_dir: Path) -> str:
    """Give an appliance activated before sealing v2 its hybrid key; return what was done.

    Order matters for crash safety: the key is stored locally first, then sent; re-running
    after a crash resends the same public key (the platform accepts it again).
    """
    st = statemod.load_state(state_dir)
    try:
        hybrid = statemod.load_hybrid_key(st.keystore)
        created = hybrid is None
        if hybrid is None:
            hybrid, _ = generate_hybrid_keypair()
            statemod.store_hybrid_key(st.keystore, hybrid)  # TPM-wrapped with the tpm keystore
        try:
            public = sealing.hybrid_public_from_private(hybrid)
        finally:
            wipe(hybrid)
        clock = timesync.Clock()
        # The factory: through the proxy bound at activation, like every other client.
        anon = platform_client_for(st, clock, mutual=False)
        client = platform_client_for(st, clock, mutual=True)
        st.forget_tls_key()  # OpenSSL holds it now
        try:
            await timesync.sync(anon.time, clock)
            await client.upload_seal_key(public)
        except PlatformError as e:
            raise platform_error(e, "sending the hybrid sealing key") from None
    finally:
        st.forget()  # only now: the clients share the state's proxy credentials
    return "created and registered" if created else "already present; registered again"


def cmd_seal_key(args: argparse.Namespace) -> int:
    """``scanner-agent seal-key upgrade``."""
    harden_process()  # the keys are unwrapped into memory
    ksmod.quiet_tss_logging()
    outcome = trio.run(upgrade_seal_key, args.state_dir.absolute())
    print(f"hybrid sealing key {outcome}; restart the agent so that it loads the key")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    """``scanner-agent run``."""
    try:
        scan = ScanOptions(
            concurrency=args.concurrency,
            connect_timeout=args.connect_timeout,
            banner_timeout=args.banner_timeout,
        )
    except ValueError as e:
        raise UsageError(f"{e}; fix the option") from None
    # Before the first key (TLS client key, sealing keys, keyslot passphrase) enters this
    # process: with the tpm keystore, load_state unwraps them into memory.
    harden_process()
    ksmod.quiet_tss_logging()
    try:
        state = statemod.load_state(args.state_dir.absolute(), args.tcti)
    except PcrMismatchError as e:
        # No key, so no session: still tell the platform, with the TPM's quote (exit 30 either way).
        setup_logging(args.debug, timesync.Clock())
        raise report_mismatch(args.state_dir.absolute(), args.tcti, e) from None
    settings = RunSettings(
        once=args.once,
        poll_wait=args.poll_wait,
        volume_size=args.volume_size,
        backend=args.backend,
        jobs=JobSettings(scan, upload_backoff_max=args.upload_backoff_max),
    )
    agent = Agent(state, settings)
    setup_logging(args.debug, agent.clock)
    return trio.run(agent.run)


def cmd_migrate(args: argparse.Namespace) -> int:
    """``scanner-agent migrate-keystore``: file keystore -> TPM (agent.keystore.migrate)."""
    harden_process()
    ksmod.quiet_tss_logging()
    done = migrate_to_tpm(args.state_dir.absolute(), args.tcti, args.tpm_pcrs)
    if done.resumed:
        print(f"appliance {done.appliance}: interrupted migration finished; keys in the TPM")
    else:
        verdict = attest_state(args.state_dir.absolute(), done.tcti)
        print(f"appliance {done.appliance} now keeps its keys in the TPM ({done.tcti}, {verdict}); "
              "new TLS key and certificate, old certificate revoked")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        if args.command == "activate":
            return cmd_activate(args)
        if args.command == "migrate-keystore":
            return cmd_migrate(args)
        if args.command == "seal-key":
            return cmd_seal_key(args)
        if args.command == "attest":
            return cmd_attest(args)
        return cmd_run(args)
    except UsageError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except AgentError as e:
        if debug:
            traceback.print_exc()
        print(f"{PROG}: {e.one_line()}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception as e:  # noqa: BLE001 - last resort: one line, no traceback unless --debug
        if debug:
            traceback.print_exc()
        print(
            f"{PROG}: internal error ({type(e).__name__}); run with --debug for a traceback",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
