"""`scanner-platform`: the reference platform's command line.

Exit codes: `tools/platform/exitcodes.py` (0 success, 2 usage, 3 not found, 4 conflict,
5 state directory, 6 out of scope, 7 shredding unproven; each explained there). Errors are
one line on stderr; --debug adds the traceback.

Every command that needs the database opens it with ``with cliargs.storage(args) as storage:``
(closed on the way out, whatever happens) and keeps it open no longer than its queries.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from protocol import api, sealing
from scratchfs.keyholder import logformat
from tools.platform import bounds, ca, cli_identity, cliargs, db, exitcodes, health, policy, state, views

DEFAULT_CODE_TTL = 24 * 3600.0


# --- commands ---------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    # Check the hook before creating anything: a typo must not leave a half-made platform.
    argv = cliargs.hook_argv(args.alert_hook) if args.alert_hook else None
    ek_ca = cli_identity.read_ek_ca(args.ek_ca) if args.ek_ca else None
    paths = state.init_state(Path(args.state_dir), args.hostname, args.database)
    with state.open_storage(paths, pool_size=1) as storage:
        storage.set_setting("hostname", args.hostname)
        storage.set_setting(
            health.SETTING_HEARTBEAT, health.Policy(args.heartbeat_interval, args.missing_after).to_setting()
        )
        if argv is not None:
            storage.set_setting(health.SETTING_ALERT_HOOK, health.Hook(tuple(argv), args.alert_timeout).to_setting())
        if ek_ca is not None:
            storage.set_setting(db.SETTING_EK_CA, ek_ca)
    print(f"platform initialised in {paths.root} for {args.hostname}; give appliances {paths.ca_cert}")
    return exitcodes.OK


def cmd_serve(args: argparse.Namespace) -> int:
    import trio

    from tools.platform.handlers import AppConfig
    from tools.platform.server import limits_from_args, run_server

    paths = cliargs.state_paths(args)
    config = AppConfig(
        lease_seconds=args.lease_seconds,
        max_result_bytes=args.max_result_bytes,
        poll_interval=args.poll_interval,
    )
    limits = limits_from_args(args)
    host, port = args.listen
    try:
        trio.run(functools.partial(run_server, paths, host, port, config, limits, pool_size=args.db_pool))
    except OSError as e:
        raise cliargs.CliError(
            f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --listen",
            exitcodes.FAILURE,
        ) from None
    return exitcodes.OK


def cmd_appliance_add(args: argparse.Namespace) -> int:
    with cliargs.storage(args) as storage:
        code = ca.new_activation_code()
        now = time.time()
        storage.add_appliance(args.name, ca.code_hash(code), now + args.code_ttl, now)
    print(
        f"appliance {args.name} added; activation code valid until {views.ts(now + args.code_ttl)}",
        file=sys.stderr,
    )
    print(code)
    return exitcodes.OK


def cmd_appliance_pubkey(args: argparse.Namespace) -> int:
    with cliargs.storage(args) as storage:
        app = storage.appliance(args.name)
    if app.x25519_public is None:
        raise cliargs.CliError(
            f"appliance {args.name!r} is {app.state} and has no sealing key; activate it first",
            exitcodes.CONFLICT,
        )
    if args.x25519:
        sys.stdout.write(sealing.public_key_to_pem(app.x25519_public).decode())
        return exitcodes.OK
    if app.hybrid_public is None:
        raise cliargs.CliError(
            f"appliance {args.name!r} has no hybrid sealing key yet; run "
            "'scanner-agent seal-key upgrade STATE_DIR' on it, then ask again",
            exitcodes.CONFLICT,
        )
    sys.stdout.write(sealing.hybrid_public_to_pem(app.hybrid_public).decode())
    return exitcodes.OK


def cmd_appliance_deactivate(args: argparse.Namespace) -> int:
    with cliargs.storage(args) as storage:
        try:
            app = storage.deactivate(args.name, time.time())
        except db.ShredUnproven as e:
            raise cliargs.CliError(str(e), exitcodes.UNPROVEN) from None
    print(
        f"appliance {app.name} deactivated: keyslot passphrase destroyed (verified absent from the "
        f"database files), certificate {app.cert_serial or '-'} revoked"
    )
    return exitcodes.OK


def cmd_policy(args: argparse.Namespace) -> int:
    with cliargs.storage(args) as storage:
        if args.value is not None:
            storage.set_setting(db.SETTING_CLONE_QUARANTINE, args.value == "on")
        value = storage.get_setting(db.SETTING_CLONE_QUARANTINE)
    print(f"clone-quarantine {'off' if value is False else 'on'}")
    return exitcodes.OK


def cmd_appliance_list(args: argparse.Namespace) -> int:
    with cliargs.storage(args) as storage:
        apps = storage.appliances()
        clones = storage.clone_states()
        key_states = storage.key_states()
        healths = {h.name: h for h in storage.health()}
        beat_policy = health.Policy.load(storage)
        attested = storage.attestations()
    fleet = views.Fleet(apps, clones, healths, beat_policy, time.time(), attested, key_states)
    print(json.dumps(views.appliance_docs(fleet), indent=2) if args.json else views.appliance_table(fleet))
    return exitcodes.OK


def cmd_alert_hook_set(args: argparse.Namespace) -> int:
    argv = cliargs.hook_argv(args.hook_command)
    with cliargs.storage(args) as storage:
        storage.set_setting(health.SETTING_ALERT_HOOK, health.Hook(tuple(argv), args.timeout).to_setting())
    print(f"alert hook set: {shlex.join(argv)} (timeout {args.timeout:g} s)")
    return exitcodes.OK


def cmd_alert_hook_show(args: argparse.Namespace) -> int:
    with cliargs.storage(args) as storage:
        hook = health.Hook.load(storage)
    print("none" if hook is None else f"{shlex.join(hook.argv)} (timeout {hook.timeout:g} s)")
    return exitcodes.OK


def cmd_alert_hook_clear(args: argparse.Namespace) -> int:
    with cliargs.storage(args) as storage:
        storage.delete_setting(health.SETTING_ALERT_HOOK)
    print("alert hook cleared")
    return exitcodes.OK


def cmd_heartbeat_set(args: argparse.Namespace) -> int:
    if args.interval is None and args.missing_after is None:
        raise cliargs.CliError("nothing to set; give --interval and/or --missing-after", exitcodes.USAGE)
    with cliargs.storage(args) as storage:
        old = health.Policy.load(storage)
        new = health.Policy(
            args.interval if args.interval is not None else old.interval,
            args.missing_after if args.missing_after is not None else old.missing_after,
        )
        storage.set_setting(health.SETTING_HEARTBEAT, new.to_setting())
    print(f"heartbeat interval {new.interval:g} s; missing after {new.missing_after} missed beats")
    return exitcodes.OK


def cmd_heartbeat_show(args: argparse.Namespace) -> int:
    with cliargs.storage(args) as storage:
        beat_policy = health.Policy.load(storage)
    print(f"heartbeat interval {beat_policy.interval:g} s; missing after {beat_policy.missing_after} missed beats")
    return exitcodes.OK


def cmd_credential_add(args: argparse.Namespace) -> int:
    try:
        if args.sealed == "-":
            blob = sys.stdin.buffer.read(sealing.MAX_PLAINTEXT + 1024)
        else:
            blob = Path(args.sealed).read_bytes()
    except OSError as e:
        raise cliargs.CliError(f"cannot read {args.sealed}: {e.strerror}; check the path", exitcodes.USAGE) from None
    try:
        sealing.check_format(blob)
        policy.credential_scope(blob)
    except sealing.SealError as e:
        raise cliargs.CliError(f"{args.sealed}: {e}; produce it with scanner-seal", exitcodes.USAGE) from None
    except policy.PolicyError as e:
        raise cliargs.CliError(f"{args.sealed}: {e}", exitcodes.USAGE) from None
    with cliargs.storage(args) as storage:
        storage.add_credential(args.appliance, args.name, blob, time.time())
    print(f"credential {args.name} stored for {args.appliance} (sealed, {len(blob)} bytes)")
    return exitcodes.OK


def cmd_credential_list(args: argparse.Namespace) -> int:
    with cliargs.storage(args) as storage:
        storage.appliance(args.appliance)
        names = storage.credentials(args.appliance)
    for n in names:
        print(n)
    return exitcodes.OK


def cmd_job_add(args: argparse.Namespace) -> int:
    try:
        targets = api.parse_targets(args.targets)
        ports = api.format_port_spec(api.parse_port_spec(args.ports))
    except api.SpecError as e:
        raise cliargs.CliError(f"{e}; see 'job add --help'", exitcodes.USAGE) from None
    with cliargs.storage(args) as storage:
        job_id = storage.add_job(args.appliance, targets, ports, args.engine, args.credential, time.time())
    print(job_id)
    return exitcodes.OK


def cmd_job_list(args: argparse.Namespace) -> int:
    with cliargs.storage(args) as storage:
        jobs = storage.jobs(args.appliance)
    print(json.dumps([views.job_doc(j) for j in jobs], indent=2) if args.json else views.job_table(jobs))
    return exitcodes.OK


def cmd_results_show(args: argparse.Namespace) -> int:
    with cliargs.storage(args) as storage:
        job = storage.job(args.job)
        res = storage.result(args.job)
    try:
        doc: Any = json.loads(res.body)
    except (ValueError, UnicodeDecodeError):
        doc = None
    if args.json:
        print(
            json.dumps(
                {
                    "job": str(job.id),
                    "appliance": job.appliance,
                    "sha256": res.sha256,
                    "size": res.size,
                    "received_at": res.received_at,
                    "attempts": job.attempts,
                    "result": doc,
                },
                indent=2,
            )
        )
        return exitcodes.OK
    print(
        f"job {job.id}  appliance {job.appliance}  received {views.ts(res.received_at)}  "
        f"{res.size} bytes  sha256 {res.sha256}"
    )
    table = views.result_table(doc)
    if table is not None:
        print(table)
    elif doc is not None:
        print(json.dumps(doc, indent=2))
    else:
        print("(result is not JSON; use --json for metadata)")
    return exitcodes.OK


def cmd_syslog_set(args: argparse.Namespace) -> int:
    try:
        ca_pem = Path(args.ca).read_text("ascii")
    except (OSError, UnicodeDecodeError) as e:
        raise cliargs.CliError(f"cannot read CA file {args.ca}: {e}; pass a PEM file", exitcodes.USAGE) from None
    if "-----BEGIN CERTIFICATE-----" not in ca_pem:
        raise cliargs.CliError(f"{args.ca} holds no PEM certificate; pass the syslog server's CA", exitcodes.USAGE)
    with cliargs.storage(args) as storage:
        storage.set_setting("syslog", {"host": args.host, "port": args.port, "ca": ca_pem})
    print(f"syslog target set to {args.host}:{args.port}")
    return exitcodes.OK


def cmd_syslog_show(args: argparse.Namespace) -> int:
    with cliargs.storage(args) as storage:
        value = storage.get_setting("syslog")
    print("none" if value is None else f"{value['host']}:{value['port']}")
    return exitcodes.OK


def cmd_syslog_clear(args: argparse.Namespace) -> int:
    with cliargs.storage(args) as storage:
        storage.delete_setting("syslog")
    print("syslog target cleared")
    return exitcodes.OK


def cmd_crl(args: argparse.Namespace) -> int:
    paths = cliargs.state_paths(args)
    with cliargs.storage(args) as storage:
        revoked = storage.revoked()
    sys.stdout.write(ca.build_crl(state.load_ca(paths), revoked).decode())
    return exitcodes.OK


# --- parser -----------------------------------------------------------------------------


def _add_init(sub: Any) -> None:
    sp = cliargs.leaf(sub, "init", cmd_init, "create CA, server certificate, KEK and database", state_flag=False)
    sp.add_argument("state_dir", metavar="STATE_DIR")
    sp.add_argument("--hostname", required=True, help="name appliances use to reach the server")
    sp.add_argument(
        "--database",
        metavar="URL",
        help="PostgreSQL URL (postgresql://user@host/db; password in ~/.pgpass) instead of the embedded SQLite file",
    )
    sp.add_argument(
        "--heartbeat-interval",
        type=cliargs.interval,
        default=api.DEFAULT_HEARTBEAT_INTERVAL,
        metavar="SECONDS",
        help=f"how often appliances report (default {api.DEFAULT_HEARTBEAT_INTERVAL:g})",
    )
    sp.add_argument(
        "--missing-after",
        type=cliargs.missing_after,
        default=health.DEFAULT_MISSING_AFTER,
        metavar="N",
        help=f"missed beats after which an appliance is 'missing' (default {health.DEFAULT_MISSING_AFTER})",
    )
    sp.add_argument(
        "--alert-hook",
        metavar="COMMAND",
        help="program (and arguments) run without a shell on each heartbeat state change; gets the event as JSON",
    )
    sp.add_argument(
        "--alert-timeout",
        type=cliargs.hook_timeout,
        default=health.DEFAULT_HOOK_TIMEOUT,
        metavar="SECONDS",
        help="the alert hook is killed after this long",
    )
    sp.add_argument(
        "--ek-ca",
        metavar="FILE",
        help="PEM bundle of the TPM manufacturers' CAs whose EK certificates are trusted (attestation)",
    )


def _add_serve(sub: Any) -> None:
    sp = cliargs.leaf(sub, "serve", cmd_serve, "serve the HTTPS API (mutual TLS)", state_flag=False)
    sp.add_argument("state_dir", metavar="STATE_DIR")
    sp.add_argument(
        "--listen",
        type=cliargs.listen,
        default=("127.0.0.1", 8443),
        metavar="HOST:PORT",
        help="address to listen on (port 0: any free port; see STATE_DIR/serve.addr)",
    )
    sp.add_argument(
        "--lease-seconds",
        type=cliargs.positive,
        default=300.0,
        help="how long a handed-out job stays leased before it is offered again",
    )
    sp.add_argument(
        "--max-result-bytes",
        type=cliargs.nbytes,
        default=api.MAX_RESULT_BODY_DEFAULT,
        help="largest accepted result upload",
    )
    sp.add_argument(
        "--poll-interval",
        type=cliargs.positive,
        default=0.5,
        help="how often a long poll re-checks the database for new jobs",
    )
    bounds.add_limit_flags(sp)
    sp.add_argument("--db-pool", type=cliargs.count, default=16, help="PostgreSQL connections of this node (SQLite: 1)")


def _add_appliance(sub: Any) -> None:
    asub = cliargs.group(sub, "appliance", "manage appliances")
    sp = cliargs.leaf(asub, "add", cmd_appliance_add, "add an appliance; prints its activation code")
    sp.add_argument("name", type=cliargs.name)
    sp.add_argument(
        "--code-ttl",
        type=cliargs.positive,
        default=DEFAULT_CODE_TTL,
        metavar="SECONDS",
        help="activation code lifetime (default 86400)",
    )
    sp = cliargs.leaf(
        asub, "pubkey", cmd_appliance_pubkey, "print the appliance's hybrid sealing key (for scanner-seal)"
    )
    sp.add_argument("name", type=cliargs.name)
    sp.add_argument("--x25519", action="store_true", help="print the v1 X25519 key (PEM) instead")
    sp = cliargs.leaf(
        asub, "deactivate", cmd_appliance_deactivate, "destroy the volume key's platform part, revoke the certificate"
    )
    sp.add_argument("name", type=cliargs.name)
    cli_identity.add_rotate_volume_key(asub)
    sp = cliargs.leaf(
        asub, "list", cmd_appliance_list, "list appliances: state, health (heartbeats, quarantine), keystore, boots"
    )
    sp.add_argument("--json", action="store_true")
    cli_identity.add_commands(sub, asub)


def _add_policies(sub: Any) -> None:
    psub = cliargs.group(sub, "policy", "platform policies")
    sp = cliargs.leaf(
        psub, "clone-quarantine", cmd_policy,
        "quarantine an appliance that shows clone signs (default on); no argument shows the setting",
    )  # fmt: skip
    sp.add_argument("value", nargs="?", choices=["on", "off"])

    hsub = cliargs.group(sub, "heartbeat", "how often appliances report, when they count as missing")
    sp = cliargs.leaf(hsub, "set", cmd_heartbeat_set, "set the heartbeat interval and/or missing threshold")
    sp.add_argument("--interval", type=cliargs.interval, metavar="SECONDS")
    sp.add_argument("--missing-after", type=cliargs.missing_after, metavar="N")
    cliargs.leaf(hsub, "show", cmd_heartbeat_show, "show the heartbeat policy")

    ahsub = cliargs.group(sub, "alert-hook", "command run on heartbeat state changes")
    sp = cliargs.leaf(ahsub, "set", cmd_alert_hook_set, "set the alert hook (run without a shell, event JSON on stdin)")
    sp.add_argument("hook_command", metavar="COMMAND", help="program and arguments, one string")
    sp.add_argument("--timeout", type=cliargs.hook_timeout, default=health.DEFAULT_HOOK_TIMEOUT, metavar="SECONDS")
    cliargs.leaf(ahsub, "show", cmd_alert_hook_show, "show the alert hook")
    cliargs.leaf(ahsub, "clear", cmd_alert_hook_clear, "remove the alert hook")


def _add_work(sub: Any) -> None:
    jsub = cliargs.group(sub, "job", "manage jobs")
    sp = cliargs.leaf(jsub, "add", cmd_job_add, "queue a scan job; prints its id")
    sp.add_argument("appliance", type=cliargs.name)
    sp.add_argument("--targets", required=True, help="comma list of IPs, CIDRs, hostnames")
    sp.add_argument("--ports", required=True, help="comma list of ports and ranges")
    sp.add_argument("--engine", choices=list(api.ENGINES), default=api.ENGINE_BUILTIN)
    sp.add_argument("--credential", type=cliargs.name, help="name of a credential of this appliance")
    sp = cliargs.leaf(jsub, "list", cmd_job_list, "list jobs")
    sp.add_argument("--appliance", type=cliargs.name)
    sp.add_argument("--json", action="store_true")

    rsub = cliargs.group(sub, "results", "read results")
    sp = cliargs.leaf(rsub, "show", cmd_results_show, "show a job's result")
    sp.add_argument("job", type=cliargs.job_id)
    sp.add_argument("--json", action="store_true")

    csub = cliargs.group(sub, "credential", "manage sealed credentials")
    sp = cliargs.leaf(csub, "add", cmd_credential_add, "store a credential sealed with scanner-seal")
    sp.add_argument("name", type=cliargs.name)
    sp.add_argument("--appliance", type=cliargs.name, required=True)
    sp.add_argument("--sealed", required=True, metavar="FILE", help="sealed blob ('-': stdin)")
    sp = cliargs.leaf(csub, "list", cmd_credential_list, "list an appliance's credential names")
    sp.add_argument("--appliance", type=cliargs.name, required=True)


def _add_syslog_and_crl(sub: Any) -> None:
    ssub = cliargs.group(sub, "syslog", "remote syslog target told to appliances")
    sp = cliargs.leaf(ssub, "set", cmd_syslog_set, "set the RFC 5425 (TLS) syslog target")
    sp.add_argument("--host", required=True)
    sp.add_argument("--port", type=cliargs.port, required=True)
    sp.add_argument("--ca", required=True, metavar="FILE", help="CA certificate (PEM)")
    cliargs.leaf(ssub, "show", cmd_syslog_show, "show the syslog target")
    cliargs.leaf(ssub, "clear", cmd_syslog_clear, "remove the syslog target")

    cliargs.leaf(sub, "crl", cmd_crl, "print the revocation list as an X.509 CRL (PEM)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    p = cliargs.Parser(prog=cliargs.PROG, description="Reference platform for scratchfs appliances.")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    p.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="stderr log level"
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=cliargs.Parser)
    for add in (_add_init, _add_serve, _add_appliance, _add_policies, _add_work, _add_syslog_and_crl):
        add(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `scanner-platform`; returns the exit code."""
    os.umask(0o077)  # database, WAL and anything else we create: owner only
    args = build_parser().parse_args(argv)
    logformat.setup(getattr(logging, args.log_level))
    try:
        return int(args.func(args))
    except cliargs.CliError as e:
        return _fail(args, str(e), e.code)
    except db.NotFound as e:
        return _fail(args, str(e), exitcodes.NOT_FOUND)
    except db.Conflict as e:
        return _fail(args, str(e), exitcodes.CONFLICT)
    except policy.OutOfScope as e:
        return _fail(args, str(e), exitcodes.SCOPE)
    except (state.StateError, db.StorageError, ca.CAError) as e:
        return _fail(args, str(e), exitcodes.STATE)
    except KeyboardInterrupt:
        return _fail(args, "interrupted", exitcodes.FAILURE)
    except Exception as e:  # noqa: BLE001 — last resort: still one line unless --debug
        return _fail(args, f"unexpected {type(e).__name__}: {e}; rerun with --debug", exitcodes.FAILURE)


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    if args.debug:
        logging.getLogger("scanner-platform").exception("error")
    print(f"{cliargs.PROG}: {message}", file=sys.stderr)
    return code
