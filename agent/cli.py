"""``scanner-agent``: activate an appliance, or run it.

    scanner-agent activate STATE_DIR --platform URL --ca CA_FILE --code CODE
                  [--proxy http://HOST:PORT [--proxy-auth-fd FD]]
    scanner-agent run STATE_DIR [--once]

Exit codes (docs/agent.md): 0 ok, 2 usage, 20 state, 21 tampered state, 22 platform/TLS,
23 activation refused, 24 deactivated (keyslots erased), 25 volume, 26 scratchfs,
27 time sync, 28 internal error. Every error is one line on stderr; --debug adds a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import NoReturn

import trio

from agent import state as statemod
from agent import timesync
from agent.errors import (
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_USAGE,
    ActivationError,
    AgentError,
    StateError,
)
from agent.jobs import JobSettings
from agent.lifecycle import Agent, RunSettings, platform_client_for, platform_error
from agent.scan.model import ScanOptions
from agent.tls import client_context
from protocol import api, sealing
from protocol.client import PlatformClient, PlatformError, new_client_key_and_csr
from protocol.proxy import ProxyConfig
from protocol.sealing import generate_hybrid_keypair, generate_keypair
from scratchfs.keyholder.hardening import harden_process
from scratchfs.keyholder.wipe import wipe

PROG = "scanner-agent"
LOG_FORMAT = "%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s %(message)s"


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
    a.add_argument("--proxy", metavar="URL",
                   help="HTTP CONNECT proxy http://HOST:PORT for every platform and syslog "
                        "connection (fixed at activation)")
    a.add_argument("--proxy-auth-fd", type=int, metavar="FD",
                   help="read the proxy's user:password from this file descriptor "
                        "(never from argv)")

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
    return p


def setup_logging(debug: bool, clock: timesync.Clock) -> None:
    """Local logs to stderr, timestamps in platform-synced UTC."""
    handler = logging.StreamHandler(sys.stderr)
    formatter = logging.Formatter(LOG_FORMAT, datefmt="%Y-%m-%dT%H:%M:%S")
    formatter.converter = lambda t: time.gmtime((t or time.time()) + clock.offset)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)


async def activate(
    state_dir: Path, url: str, ca_pem: bytes, code: str, proxy: ProxyConfig | None = None
) -> str:
    """Activate with the platform and write the bound state dir; return the appliance name.

    With *proxy*, activation itself already goes through it (no direct connection).
    """
    try:
        endpoint = statemod.PlatformEndpoint.parse(url)
    except ValueError as e:
        raise UsageError(f"{e}; give --platform https://HOST[:PORT]") from None
    if state_dir.exists() and (not state_dir.is_dir() or any(state_dir.iterdir())):
        raise ActivationError(
            f"state dir {state_dir} is not empty (already activated?)",
            "activate into an empty or new directory",
        )
    clock = timesync.Clock()
    try:
        anon = PlatformClient(endpoint.url, client_context(ca_pem, clock), proxy=proxy)
    except (ValueError, UnicodeDecodeError):
        raise UsageError(
            "the CA file does not hold a PEM certificate; give the platform's CA"
        ) from None
    try:
        await timesync.sync(anon.time, clock)
        key_pem, csr_pem = new_client_key_and_csr("scanner-appliance")
        seal_private, seal_public = generate_keypair()
        hybrid_private, hybrid_public = generate_hybrid_keypair()
        result = await anon.activate(code, csr_pem, seal_public, hybrid_public)
    except PlatformError as e:
        if e.reason in (api.REASON_INVALID_CODE, api.REASON_CODE_EXPIRED):
            raise ActivationError(
                f"the platform refused the activation code ({e.reason})"
            ) from None
        raise platform_error(e, "activation") from None
    statemod.write_state(
        state_dir, endpoint, result.appliance, ca_pem, result.certificate_pem, key_pem,
        seal_private, clock.now(), hybrid_private, proxy,
    )
    wipe(hybrid_private)
    statemod.load_state(state_dir)  # prove the state we wrote verifies
    return result.appliance


def _read_code(value: str) -> str:
    code = sys.stdin.readline().strip() if value == "-" else value
    if not code:
        raise UsageError("empty activation code; pass --code CODE or --code - with it on stdin")
    return code


def _read_proxy_credentials(fd: int) -> bytes:
    """user:password from an inherited descriptor: secrets never travel in argv or env."""
    data = b""
    try:
        while len(data) <= statemod.MAX_PROXY_CREDENTIALS:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
    except OSError as e:
        raise UsageError(
            f"cannot read proxy credentials from fd {fd}: {e.strerror}; "
            "pass an open descriptor to --proxy-auth-fd"
        ) from None
    finally:
        if fd != 0:
            os.close(fd)
    if len(data) > statemod.MAX_PROXY_CREDENTIALS:
        raise UsageError("proxy credentials are too long; give user:password on one line")
    return data.rstrip(b"\r\n")


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
    proxy = _proxy_from_args(args)
    code = _read_code(args.code)
    name = trio.run(activate, args.state_dir, args.platform, ca_pem, code, proxy)
    print(f"activated appliance {name}; state in {args.state_dir}")
    return EXIT_OK


async def upgrade_seal_key(state_dir: Path) -> str:
    """Give an appliance activated before sealing v2 its hybrid key; return what was done.

    Order matters for crash safety: the key is stored locally first, then sent; re-running
    after a crash resends the same public key (the platform accepts it again).
    """
    st = statemod.load_state(state_dir)
    hybrid = statemod.load_hybrid_key(state_dir)
    created = hybrid is None
    if hybrid is None:
        hybrid, _ = generate_hybrid_keypair()
        statemod.store_hybrid_key(state_dir, hybrid)
    try:
        public = sealing.hybrid_public_from_private(hybrid)
    finally:
        wipe(hybrid)
        st.forget()
    clock = timesync.Clock()
    client = platform_client_for(st, clock, mutual=True)
    try:
        await timesync.sync(client.time, clock)
        await client.upload_seal_key(public)
    except PlatformError as e:
        raise platform_error(e, "sending the hybrid sealing key") from None
    return "created and registered" if created else "already present; registered again"


def cmd_seal_key(args: argparse.Namespace) -> int:
    """``scanner-agent seal-key upgrade``."""
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
    state = statemod.load_state(args.state_dir.absolute())
    # Before the first key (TLS client key, volume keyslot passphrase) enters this process.
    harden_process()
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


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        if args.command == "activate":
            return cmd_activate(args)
        if args.command == "seal-key":
            return cmd_seal_key(args)
        return cmd_run(args)
    except UsageError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except AgentError as e:
        if debug:
            traceback.print_exc()
        print(f"{PROG}: {e.one_line()}", file=sys.stderr)
        return e.exit_code
    except StateError as e:  # pragma: no cover - StateError is an AgentError; kept for clarity
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
