"""`scanner-platform`: the reference platform's command line.

Exit codes: 0 success; 1 runtime failure (e.g. cannot listen); 2 usage error (bad flags,
names or specs); 3 not found (appliance, job, credential, result); 4 conflict (exists
already, deactivated, not active); 5 state directory problem (not initialised, unsafe
permissions, database from a newer version or unreachable); 6 a job's targets lie outside
its credential's scope (or the credential has none); 7 deactivation committed but
destruction of the wrapped keyslot passphrase not proven (rerun the same command once
readers are gone). Errors are one line on stderr; --debug adds the traceback.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import logging
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from protocol import api, sealing
from tools.platform import ca, db, db_attestation, health, state

PROG = "scanner-platform"
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_CONFLICT = 4
EXIT_STATE = 5
EXIT_SCOPE = 6
EXIT_UNPROVEN = 7
STATE_ENV = "SCANNER_PLATFORM_STATE"
DEFAULT_CODE_TTL = 24 * 3600.0


class CliError(Exception):
    """A one-line error with its exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, like every other error of ours (argparse would print the usage too).
        self.exit(EXIT_USAGE, f"{PROG}: {message}; see '{self.prog} --help'\n")


def _name(value: str) -> str:
    if not api.NAME_RE.match(value):
        raise argparse.ArgumentTypeError(f"invalid name {value!r} (1-63 chars: letters, digits, '.', '_', '-')")
    return value


def _positive(value: str) -> float:
    try:
        f = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0 < f < 10**9:
        raise argparse.ArgumentTypeError(f"{value!r} must be a positive number of seconds")
    return f


def _count(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if not 1 <= n <= 1_000_000:
        raise argparse.ArgumentTypeError(f"{n} is outside 1-1000000")
    return n


def _bytes(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of bytes") from None
    if not 1 <= n <= 1024**3:
        raise argparse.ArgumentTypeError(f"{n} is outside 1 byte - 1 GiB")
    return n


def _port(value: str) -> int:
    try:
        p = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number") from None
    if not 1 <= p <= 65535:
        raise argparse.ArgumentTypeError(f"port {p} is outside 1-65535")
    return p


def _interval(value: str) -> float:
    f = _positive(value)
    if not api.MIN_HEARTBEAT_INTERVAL <= f <= api.MAX_HEARTBEAT_INTERVAL:
        raise argparse.ArgumentTypeError(
            f"{value!r} must be between {api.MIN_HEARTBEAT_INTERVAL:g} and {api.MAX_HEARTBEAT_INTERVAL:g} seconds"
        )
    return f


def _missing_after(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of beats") from None
    if not 1 <= n <= health.MAX_MISSING_AFTER:
        raise argparse.ArgumentTypeError(f"{value!r} must be between 1 and {health.MAX_MISSING_AFTER}")
    return n


def _hook_timeout(value: str) -> float:
    f = _positive(value)
    if f > health.MAX_HOOK_TIMEOUT:
        raise argparse.ArgumentTypeError(f"{value!r} must be at most {health.MAX_HOOK_TIMEOUT:g} seconds")
    return f


def _hook_argv(command: str) -> list[str]:
    """Split the hook command into argv (shell-like quoting, but it never runs in a shell)."""
    try:
        argv = shlex.split(command)
    except ValueError as e:
        raise CliError(f"cannot parse the alert hook command ({e}); check its quoting", EXIT_USAGE) from None
    if not argv:
        raise CliError("the alert hook command is empty; give a program and its arguments", EXIT_USAGE)
    program = argv[0]
    found = shutil.which(program) if "/" not in program else (program if os.access(program, os.X_OK) else None)
    if found is None:
        raise CliError(f"alert hook program {program!r} is not an executable file; give its path", EXIT_USAGE)
    return argv


def _listen(value: str) -> tuple[str, int]:
    host, sep, port_s = value.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT")
    try:
        port = int(port_s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: port is not a number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r}: port outside 0-65535")
    return host.strip("[]"), port


def _job_id(value: str) -> int:
    job_id = api.parse_job_id(value)
    if job_id is None:
        raise argparse.ArgumentTypeError(f"{value!r} is not a job id (see 'job list')")
    return job_id


def _ts(value: float | None) -> str:
    if value is None:
        return "-"
    return dt.datetime.fromtimestamp(value, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _printable(text: str, width: int) -> str:
    clean = "".join(ch if ch.isprintable() else "." for ch in text)
    return clean if len(clean) <= width else clean[: width - 1] + "~"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows)


# --- state helpers ----------------------------------------------------------------------


def _paths(args: argparse.Namespace) -> state.StatePaths:
    root = args.state_dir if getattr(args, "state_dir", None) else (args.state or os.environ.get(STATE_ENV))
    if not root:
        raise CliError(f"no state directory; pass --state DIR or set {STATE_ENV}", EXIT_USAGE)
    return state.StatePaths(Path(root))


def _storage(args: argparse.Namespace) -> db.Storage:
    paths = _paths(args)
    state.check_initialised(paths)
    return state.open_storage(paths, pool_size=2)


# --- commands ---------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    # Check the hook before creating anything: a typo must not leave a half-made platform.
    argv = _hook_argv(args.alert_hook) if args.alert_hook else None
    ek_ca = _read_ek_ca(args.ek_ca) if args.ek_ca else None
    paths = state.init_state(Path(args.state_dir), args.hostname, args.database)
    storage = state.open_storage(paths, pool_size=1)
    try:
        storage.set_setting("hostname", args.hostname)
        storage.set_setting(
            health.SETTING_HEARTBEAT, health.Policy(args.heartbeat_interval, args.missing_after).to_setting()
        )
        if argv is not None:
            storage.set_setting(health.SETTING_ALERT_HOOK, health.Hook(tuple(argv), args.alert_timeout).to_setting())
        if ek_ca is not None:
            storage.set_setting(db_attestation.SETTING_EK_CA, ek_ca)
    finally:
        storage.close()
    print(f"platform initialised in {paths.root} for {args.hostname}; give appliances {paths.ca_cert}")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    import trio

    from tools.platform.handlers import AppConfig
    from tools.platform.server import ServerLimits, run_server

    paths = _paths(args)
    config = AppConfig(
        lease_seconds=args.lease_seconds,
        max_result_bytes=args.max_result_bytes,
        poll_interval=args.poll_interval,
    )
    limits = ServerLimits(
        max_connections=args.max_connections,
        max_per_source=args.max_per_source,
        max_anonymous=args.max_anonymous,
        max_anonymous_bodies=args.max_anonymous_bodies,
    )
    host, port = args.listen
    try:
        trio.run(functools.partial(run_server, paths, host, port, config, limits, pool_size=args.db_pool))
    except OSError as e:
        raise CliError(
            f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --listen",
            EXIT_FAILURE,
        ) from None
    return EXIT_OK


def cmd_appliance_add(args: argparse.Namespace) -> int:
    storage = _storage(args)
    try:
        code = ca.new_activation_code()
        now = time.time()
        storage.add_appliance(args.name, ca.code_hash(code), now + args.code_ttl, now)
    finally:
        storage.close()
    print(
        f"appliance {args.name} added; activation code valid until {_ts(now + args.code_ttl)}",
        file=sys.stderr,
    )
    print(code)
    return EXIT_OK


def cmd_appliance_pubkey(args: argparse.Namespace) -> int:
    storage = _storage(args)
    try:
        app = storage.appliance(args.name)
    finally:
        storage.close()
    if app.x25519_public is None:
        raise CliError(
            f"appliance {args.name!r} is {app.state} and has no sealing key; activate it first",
            EXIT_CONFLICT,
        )
    if args.x25519:
        sys.stdout.write(sealing.public_key_to_pem(app.x25519_public).decode())
        return EXIT_OK
    if app.hybrid_public is None:
        raise CliError(
            f"appliance {args.name!r} has no hybrid sealing key yet; run "
            "'scanner-agent seal-key upgrade STATE_DIR' on it, then ask again",
            EXIT_CONFLICT,
        )
    sys.stdout.write(sealing.hybrid_public_to_pem(app.hybrid_public).decode())
    return EXIT_OK


def cmd_appliance_deactivate(args: argparse.Namespace) -> int:
    storage = _storage(args)
    try:
        app = storage.deactivate(args.name, time.time())
    except db.ShredUnproven as e:
        raise CliError(str(e), EXIT_UNPROVEN) from None
    finally:
        storage.close()
    print(
        f"appliance {app.name} deactivated: keyslot passphrase destroyed (verified absent from the "
        f"database files), certificate {app.cert_serial or '-'} revoked"
    )
    return EXIT_OK


def cmd_appliance_clear(args: argparse.Namespace) -> int:
    keep = db.CLEAR_NEXT_BOOT if args.next_boot else args.keep  # None: the current session
    storage = _storage(args)
    try:
        reason, kept = storage.clear_quarantine(args.name, time.time(), keep)
    finally:
        storage.close()
    if kept is not None:
        decision = f"kept boot session {kept.public_id or '(current)'} (boot counter {kept.boot_counter})"
    else:
        decision = "no session kept: the next boot (attested, if the TPM is enrolled) sets the counter baseline"
    print(f"appliance {args.name} released from quarantine (was: {reason}); {decision}; every other session ended")
    return EXIT_OK


def cmd_appliance_sessions(args: argparse.Namespace) -> int:
    storage = _storage(args)
    try:
        rows = storage.sessions(args.name)
    finally:
        storage.close()
    table = [["SESSION", "BOOT COUNTER", "KEYSTORE", "EVIDENCE", "OPENED", "CURRENT"]]
    for r in rows:
        table.append([
            r.public_id or "-", str(r.boot_counter), r.keystore, "attested" if r.attested else "claimed",
            _ts(r.created_at), "yes" if r.current else "",
        ])  # fmt: skip
    print(_table(table))
    return EXIT_OK


def cmd_appliance_baseline(args: argparse.Namespace) -> int:
    from tools.platform import attestation

    storage = _storage(args)
    try:
        app = storage.appliance(args.name)
        rec = storage.attestation(app.id)
        if rec is None or rec.state != db_attestation.ATTEST_ATTESTED or rec.pcr_values is None:
            raise CliError(f"appliance {args.name} has no attested TPM, so no PCR baseline", EXIT_STATE)
        pcrs = api.attested_pcrs(rec.pcrs)
        pending = rec.pending_pcr_values
        print(f"appliance {args.name}: PCR baseline (SHA-256 bank), state {rec.pcr_state}")
        table = [["PCR", "BASELINE", "LAST REFUSED QUOTE" if pending else ""]]
        for i, pcr in enumerate(pcrs):
            new = pending[i] if pending else ""
            mark = " (changed)" if pending and new != rec.pcr_values[i] else ""
            table.append([str(pcr), rec.pcr_values[i], new + mark])
        print(_table(table))
        if not args.accept:
            if pending:
                print(f"to accept the refused values: scanner-platform appliance baseline {args.name} --accept")
            return EXIT_OK
        if not pending:
            raise CliError(f"appliance {args.name} has no refused quote to accept; nothing changed", EXIT_CONFLICT)
        digest = attestation.pcr_digest([bytes.fromhex(v) for v in pending])
        try:
            storage.accept_pcr_baseline(app.id, pending, digest, time.time())
        except ValueError as e:
            raise CliError(f"{e}; run the command again to see the current values", EXIT_CONFLICT) from None
    finally:
        storage.close()
    print(f"appliance {args.name}: new PCR baseline accepted (digest {digest.hex()})")
    return EXIT_OK


def cmd_ek_ca_set(args: argparse.Namespace) -> int:
    bundle = _read_ek_ca(args.file)
    storage = _storage(args)
    try:
        storage.set_setting(db_attestation.SETTING_EK_CA, bundle)
    finally:
        storage.close()
    print(f"trusted EK CAs set from {args.file}: TPMs with EK certificates they issued can be attested")
    return EXIT_OK


def _read_ek_ca(file: str) -> str:
    from tools.platform import attestation

    try:
        text = Path(file).read_text("ascii")
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f"cannot read EK CA file {file}: {e}; pass a PEM bundle", EXIT_USAGE) from None
    try:
        attestation.load_ek_cas(text.encode())
    except ValueError as e:
        raise CliError(f"{file} {e}; pass the TPM manufacturers' CA certificates (PEM)", EXIT_USAGE) from None
    return text


def cmd_ek_ca_show(args: argparse.Namespace) -> int:
    from tools.platform import attestation

    storage = _storage(args)
    try:
        value = storage.get_setting(db_attestation.SETTING_EK_CA)
    finally:
        storage.close()
    if not isinstance(value, str):
        print("none (no TPM can be attested)")
        return EXIT_OK
    for cert in attestation.load_ek_cas(value.encode()):
        print(f"{cert.subject.rfc4514_string()}  (until {cert.not_valid_after_utc:%Y-%m-%d})")
    return EXIT_OK


def cmd_ek_ca_clear(args: argparse.Namespace) -> int:
    storage = _storage(args)
    try:
        storage.delete_setting(db_attestation.SETTING_EK_CA)
    finally:
        storage.close()
    print("trusted EK CAs cleared: no new TPM can be enrolled (enrolled ones stay attested)")
    return EXIT_OK


def cmd_policy(args: argparse.Namespace) -> int:
    storage = _storage(args)
    try:
        if args.value is not None:
            storage.set_setting(db.SETTING_CLONE_QUARANTINE, args.value == "on")
        value = storage.get_setting(db.SETTING_CLONE_QUARANTINE)
    finally:
        storage.close()
    print(f"clone-quarantine {'off' if value is False else 'on'}")
    return EXIT_OK


def _age(value: float | None, now: float) -> str:
    if value is None:
        return "never"
    age = max(0.0, now - value)
    if age < 120:
        return f"{age:.1f}s ago"
    if age < 7200:
        return f"{age / 60:.0f}m ago"
    return f"{age / 3600:.0f}h ago"


def cmd_appliance_list(args: argparse.Namespace) -> int:
    storage = _storage(args)
    try:
        apps = storage.appliances()
        clones = storage.clone_states()
        attested = storage.attestations()
        healths = {h.name: h for h in storage.health()}
        policy = health.Policy.load(storage)
    finally:
        storage.close()
    now = time.time()
    derived = {name: health.derive(h, policy, now) for name, h in healths.items()}
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "name": a.name,
                        "state": a.state,
                        "health": derived[a.name].state,
                        "missed_beats": derived[a.name].missed,
                        "last_seen": healths[a.name].last_seen,
                        "heartbeat": healths[a.name].status,
                        "created_at": a.created_at,
                        "activated_at": a.activated_at,
                        "deactivated_at": a.deactivated_at,
                        "code_expires": a.code_expires if a.state == db.STATE_PENDING else None,
                        "cert_serial": a.cert_serial,
                        "quarantined": (c := clones.get(a.id)) is not None and c.quarantined_since is not None,
                        "quarantined_since": c.quarantined_since if c else None,
                        "quarantine_reason": c.quarantine_reason if c else None,
                        "boot_counter": c.boot_counter if c else None,
                        "keystore": c.keystore if c else None,
                        "last_boot": c.last_boot if c else None,
                        "attestation": _attestation(c, attested.get(a.id)),
                        "pcr_state": (r := attested.get(a.id)) and r.pcr_state,
                        "last_verified_boot": r.last_verified if r else None,
                    }
                    for a in apps
                ],
                indent=2,
            )
        )
        return EXIT_OK
    # One view: lifecycle STATE, HEALTH (heartbeats, with quarantine and deactivation
    # overriding them), then the heartbeat's facts and the boot sessions' (clone detection).
    rows = [
        [
            "NAME", "STATE", "HEALTH", "LAST SEEN", "UPTIME", "JOBS OK/FAILED", "KEYSTORE", "BOOTS",
            "LAST BOOT", "LAST VERIFIED BOOT", "ACTIVATED", "CERT SERIAL",
        ]
    ]  # fmt: skip
    for a in apps:
        c = clones.get(a.id)
        status = healths[a.name].status or {}
        uptime = status.get(api.HB_UPTIME)
        jobs = f"{status.get(api.HB_JOBS_DONE, '-')}/{status.get(api.HB_JOBS_FAILED, '-')}" if status else "-"
        rows.append(
            [
                a.name,
                a.state,
                derived[a.name].state,
                _age(healths[a.name].last_seen, now),
                f"{uptime:.0f}s" if isinstance(uptime, int | float) else "-",
                jobs,
                _keystore_label(c, attested.get(a.id)),
                str(c.boot_counter) if c and c.boot_counter is not None else "-",
                _ts(c.last_boot if c else None),
                _ts(rec.last_verified if (rec := attested.get(a.id)) else None),
                _ts(a.activated_at),
                a.cert_serial or "-",
            ]
        )
    print(_table(rows))
    for a in apps:
        c = clones.get(a.id)
        if c is not None and c.quarantined_since is not None and a.state == db.STATE_ACTIVE:
            why = _printable(c.quarantine_reason or "", 200)
            print(f"{a.name}: quarantined since {_ts(c.quarantined_since)}: {why}")
        rec = attested.get(a.id)
        if rec is not None and rec.pcr_state == db_attestation.PCR_MISMATCH and a.state == db.STATE_ACTIVE:
            print(
                f"{a.name}: boot refused since {_ts(rec.pending_at)}: PCR values differ from the baseline "
                f"(see 'scanner-platform appliance baseline {a.name}')"
            )
    return EXIT_OK


def _attestation(c: db.CloneState | None, rec: db_attestation.Attestation | None) -> str | None:
    """``attested`` (enrolled TPM, current session verified), ``enrolled`` (TPM enrolled, no
    verified session yet), ``claimed`` (a tpm keystore reported, nothing proven), ``none``
    (file keystore) or None (never booted)."""
    if rec is not None and rec.state == db_attestation.ATTEST_ATTESTED:
        return "attested" if c is not None and c.attested else "enrolled"
    if c is None or c.keystore is None:
        return None
    return "claimed" if c.keystore == "tpm" else "none"


def _keystore_label(c: db.CloneState | None, rec: db_attestation.Attestation | None) -> str:
    kind = c.keystore if c is not None else None
    verdict = _attestation(c, rec)
    if kind is None:
        return "tpm (enrolled)" if verdict == "enrolled" else "-"
    if kind == "file":
        return "file (unattested)"
    mismatch = rec is not None and rec.pcr_state == db_attestation.PCR_MISMATCH
    return f"{kind} ({verdict}{', PCR mismatch' if mismatch else ''})"


def cmd_alert_hook_set(args: argparse.Namespace) -> int:
    argv = _hook_argv(args.hook_command)
    storage = _storage(args)
    try:
        storage.set_setting(health.SETTING_ALERT_HOOK, health.Hook(tuple(argv), args.timeout).to_setting())
    finally:
        storage.close()
    print(f"alert hook set: {shlex.join(argv)} (timeout {args.timeout:g} s)")
    return EXIT_OK


def cmd_alert_hook_show(args: argparse.Namespace) -> int:
    storage = _storage(args)
    try:
        hook = health.Hook.load(storage)
    finally:
        storage.close()
    print("none" if hook is None else f"{shlex.join(hook.argv)} (timeout {hook.timeout:g} s)")
    return EXIT_OK


def cmd_alert_hook_clear(args: argparse.Namespace) -> int:
    storage = _storage(args)
    try:
        storage.delete_setting(health.SETTING_ALERT_HOOK)
    finally:
        storage.close()
    print("alert hook cleared")
    return EXIT_OK


def cmd_heartbeat_set(args: argparse.Namespace) -> int:
    if args.interval is None and args.missing_after is None:
        raise CliError("nothing to set; give --interval and/or --missing-after", EXIT_USAGE)
    storage = _storage(args)
    try:
        old = health.Policy.load(storage)
        new = health.Policy(
            args.interval if args.interval is not None else old.interval,
            args.missing_after if args.missing_after is not None else old.missing_after,
        )
        storage.set_setting(health.SETTING_HEARTBEAT, new.to_setting())
    finally:
        storage.close()
    print(f"heartbeat interval {new.interval:g} s; missing after {new.missing_after} missed beats")
    return EXIT_OK


def cmd_heartbeat_show(args: argparse.Namespace) -> int:
    storage = _storage(args)
    try:
        policy = health.Policy.load(storage)
    finally:
        storage.close()
    print(f"heartbeat interval {policy.interval:g} s; missing after {policy.missing_after} missed beats")
    return EXIT_OK


def cmd_credential_add(args: argparse.Namespace) -> int:
    try:
        if args.sealed == "-":
            blob = sys.stdin.buffer.read(sealing.MAX_PLAINTEXT + 1024)
        else:
            blob = Path(args.sealed).read_bytes()
    except OSError as e:
        raise CliError(f"cannot read {args.sealed}: {e.strerror}; check the path", EXIT_USAGE) from None
    try:
        sealing.check_format(blob)
        db.credential_scope(blob)
    except sealing.SealError as e:
        raise CliError(f"{args.sealed}: {e}; produce it with scanner-seal", EXIT_USAGE) from None
    except db.StorageError as e:
        raise CliError(f"{args.sealed}: {e}", EXIT_USAGE) from None
    storage = _storage(args)
    try:
        storage.add_credential(args.appliance, args.name, blob, time.time())
    finally:
        storage.close()
    print(f"credential {args.name} stored for {args.appliance} (sealed, {len(blob)} bytes)")
    return EXIT_OK


def cmd_credential_list(args: argparse.Namespace) -> int:
    storage = _storage(args)
    try:
        storage.appliance(args.appliance)
        names = storage.credentials(args.appliance)
    finally:
        storage.close()
    for n in names:
        print(n)
    return EXIT_OK


def cmd_job_add(args: argparse.Namespace) -> int:
    try:
        targets = api.parse_targets(args.targets)
        ports = api.format_port_spec(api.parse_port_spec(args.ports))
    except api.SpecError as e:
        raise CliError(f"{e}; see 'job add --help'", EXIT_USAGE) from None
    storage = _storage(args)
    try:
        job_id = storage.add_job(args.appliance, targets, ports, args.engine, args.credential, time.time())
    finally:
        storage.close()
    print(job_id)
    return EXIT_OK


def _job_doc(j: db.JobRow) -> dict[str, Any]:
    return {
        "id": str(j.id),
        "appliance": j.appliance,
        "state": j.state,
        "targets": j.targets,
        "ports": j.ports,
        "engine": j.engine,
        "credential": j.credential_name,
        "attempts": j.attempts,
        "lease_expires": j.lease_expires,
        "created_at": j.created_at,
        "completed_at": j.completed_at,
        "progress": j.progress,
        "result_sha256": j.result_sha256,
    }


def cmd_job_list(args: argparse.Namespace) -> int:
    storage = _storage(args)
    try:
        jobs = storage.jobs(args.appliance)
    finally:
        storage.close()
    if args.json:
        print(json.dumps([_job_doc(j) for j in jobs], indent=2))
        return EXIT_OK
    rows = [["ID", "APPLIANCE", "STATE", "ATTEMPTS", "TARGETS", "PORTS", "ENGINE", "CREDENTIAL", "RESULT", "PROGRESS"]]
    rows += [
        [
            str(j.id),
            j.appliance,
            j.state,
            str(j.attempts),
            _printable(",".join(j.targets), 40),
            _printable(j.ports, 30),
            j.engine,
            j.credential_name or "-",
            (j.result_sha256 or "-")[:12],
            _printable(j.progress or "-", 40),
        ]
        for j in jobs
    ]
    print(_table(rows))
    return EXIT_OK


def _render_result(doc: Any) -> str | None:
    if not isinstance(doc, dict) or not isinstance(doc.get(api.R_HOSTS), list):
        return None
    rows = [["TARGET", "ADDRESS", "PORT", "STATE", "SERVICE", "BANNER"]]
    for host in doc[api.R_HOSTS]:
        if not isinstance(host, dict):
            continue
        target = _printable(str(host.get(api.R_TARGET, "-")), 40)
        address = _printable(str(host.get(api.R_ADDRESS, "-")), 40)
        ports = host.get(api.R_PORTS) or []
        if not ports:
            rows.append([target, address, "-", "-", "-", "-"])
        for p in ports if isinstance(ports, list) else []:
            if isinstance(p, dict):
                rows.append(
                    [
                        target,
                        address,
                        str(p.get(api.R_PORT, "-")),
                        _printable(str(p.get(api.R_STATE, "-")), 12),
                        _printable(str(p.get(api.R_SERVICE) or "-"), 20),
                        _printable(str(p.get(api.R_BANNER) or "-"), 60),
                    ]
                )
    return _table(rows)


def cmd_results_show(args: argparse.Namespace) -> int:
    storage = _storage(args)
    try:
        job = storage.job(args.job)
        res = storage.result(args.job)
    finally:
        storage.close()
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
        return EXIT_OK
    print(
        f"job {job.id}  appliance {job.appliance}  received {_ts(res.received_at)}  "
        f"{res.size} bytes  sha256 {res.sha256}"
    )
    table = _render_result(doc)
    if table is not None:
        print(table)
    elif doc is not None:
        print(json.dumps(doc, indent=2))
    else:
        print("(result is not JSON; use --json for metadata)")
    return EXIT_OK


def cmd_syslog_set(args: argparse.Namespace) -> int:
    try:
        ca_pem = Path(args.ca).read_text("ascii")
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f"cannot read CA file {args.ca}: {e}; pass a PEM file", EXIT_USAGE) from None
    if "-----BEGIN CERTIFICATE-----" not in ca_pem:
        raise CliError(f"{args.ca} holds no PEM certificate; pass the syslog server's CA", EXIT_USAGE)
    storage = _storage(args)
    try:
        storage.set_setting("syslog", {"host": args.host, "port": args.port, "ca": ca_pem})
    finally:
        storage.close()
    print(f"syslog target set to {args.host}:{args.port}")
    return EXIT_OK


def cmd_syslog_show(args: argparse.Namespace) -> int:
    storage = _storage(args)
    try:
        value = storage.get_setting("syslog")
    finally:
        storage.close()
    print("none" if value is None else f"{value['host']}:{value['port']}")
    return EXIT_OK


def cmd_syslog_clear(args: argparse.Namespace) -> int:
    storage = _storage(args)
    try:
        storage.delete_setting("syslog")
    finally:
        storage.close()
    print("syslog target cleared")
    return EXIT_OK


def cmd_crl(args: argparse.Namespace) -> int:
    paths = _paths(args)
    storage = _storage(args)
    try:
        revoked = storage.revoked()
    finally:
        storage.close()
    sys.stdout.write(ca.build_crl(state.load_ca(paths), revoked).decode())
    return EXIT_OK


# --- parser -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    p = _Parser(prog=PROG, description="Reference platform for scratchfs appliances.")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    p.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="stderr log level"
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def leaf(
        parent: Any, name: str, fn: Callable[[argparse.Namespace], int], help_: str, state_flag: bool = True
    ) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = parent.add_parser(name, help=help_, description=help_)
        sp.set_defaults(func=fn)
        if state_flag:
            sp.add_argument("--state", metavar="DIR", help=f"platform state directory (default: ${STATE_ENV})")
        return sp

    sp = leaf(sub, "init", cmd_init, "create CA, server certificate, KEK and database", state_flag=False)
    sp.add_argument("state_dir", metavar="STATE_DIR")
    sp.add_argument("--hostname", required=True, help="name appliances use to reach the server")
    sp.add_argument(
        "--database",
        metavar="URL",
        help="PostgreSQL URL (postgresql://user@host/db; password in ~/.pgpass) instead of the embedded SQLite file",
    )
    sp.add_argument(
        "--heartbeat-interval",
        type=_interval,
        default=api.DEFAULT_HEARTBEAT_INTERVAL,
        metavar="SECONDS",
        help=f"how often appliances report (default {api.DEFAULT_HEARTBEAT_INTERVAL:g})",
    )
    sp.add_argument(
        "--missing-after",
        type=_missing_after,
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
        type=_hook_timeout,
        default=health.DEFAULT_HOOK_TIMEOUT,
        metavar="SECONDS",
        help="the alert hook is killed after this long",
    )
    sp.add_argument(
        "--ek-ca",
        metavar="FILE",
        help="PEM bundle of the TPM manufacturers' CAs whose EK certificates are trusted (attestation)",
    )

    sp = leaf(sub, "serve", cmd_serve, "serve the HTTPS API (mutual TLS)", state_flag=False)
    sp.add_argument("state_dir", metavar="STATE_DIR")
    sp.add_argument(
        "--listen",
        type=_listen,
        default=("127.0.0.1", 8443),
        metavar="HOST:PORT",
        help="address to listen on (port 0: any free port; see STATE_DIR/serve.addr)",
    )
    sp.add_argument(
        "--lease-seconds",
        type=_positive,
        default=300.0,
        help="how long a handed-out job stays leased before it is offered again",
    )
    sp.add_argument(
        "--max-result-bytes", type=_bytes, default=api.MAX_RESULT_BODY_DEFAULT, help="largest accepted result upload"
    )
    sp.add_argument(
        "--poll-interval", type=_positive, default=0.5, help="how often a long poll re-checks the database for new jobs"
    )
    sp.add_argument(
        "--max-connections",
        type=_count,
        default=4096,
        help="connections at once, in any phase (sized for every appliance long-polling at once)",
    )
    sp.add_argument("--max-per-source", type=_count, default=64, help="connections at once from one IP address")
    sp.add_argument(
        "--max-anonymous", type=_count, default=64, help="connections at once without a client certificate"
    )
    sp.add_argument(
        "--max-anonymous-bodies", type=_count, default=8, help="activation requests reading their body at once"
    )
    sp.add_argument("--db-pool", type=_count, default=16, help="PostgreSQL connections of this node (SQLite: 1)")

    app = sub.add_parser("appliance", help="manage appliances")
    asub = app.add_subparsers(dest="subcommand", required=True, parser_class=_Parser)
    sp = leaf(asub, "add", cmd_appliance_add, "add an appliance; prints its activation code")
    sp.add_argument("name", type=_name)
    sp.add_argument(
        "--code-ttl",
        type=_positive,
        default=DEFAULT_CODE_TTL,
        metavar="SECONDS",
        help="activation code lifetime (default 86400)",
    )
    sp = leaf(asub, "pubkey", cmd_appliance_pubkey, "print the appliance's hybrid sealing key (for scanner-seal)")
    sp.add_argument("name", type=_name)
    sp.add_argument("--x25519", action="store_true", help="print the v1 X25519 key (PEM) instead")
    sp = leaf(asub, "deactivate", cmd_appliance_deactivate, "destroy the keyslot passphrase, revoke the certificate")
    sp.add_argument("name", type=_name)
    sp = leaf(
        asub, "list", cmd_appliance_list, "list appliances: state, health (heartbeats, quarantine), keystore, boots"
    )
    sp.add_argument("--json", action="store_true")
    sp = leaf(
        asub, "clear", cmd_appliance_clear,
        "lift a clone quarantine (after stopping any copy): say which boot is legitimate; every other session ends",
    )  # fmt: skip
    sp.add_argument("name", type=_name)
    decision = sp.add_mutually_exclusive_group()
    decision.add_argument(
        "--keep", metavar="SESSION", help="the legitimate session (see 'appliance sessions'); default: the current one"
    )
    decision.add_argument(
        "--next-boot", action="store_true", help="keep no session: the next (attested) boot sets the counter baseline"
    )
    sp = leaf(asub, "sessions", cmd_appliance_sessions, "list an appliance's kept boot sessions (for 'clear --keep')")
    sp.add_argument("name", type=_name)
    sp = leaf(
        asub, "baseline", cmd_appliance_baseline,
        "show an attested appliance's PCR baseline and the last refused quote; --accept makes that the baseline",
    )  # fmt: skip
    sp.add_argument("name", type=_name)
    sp.add_argument("--accept", action="store_true", help="accept the last refused quote's PCR values")

    ek = sub.add_parser("ek-ca", help="TPM manufacturers' CAs trusted for attestation (EK certificates)")
    eksub = ek.add_subparsers(dest="subcommand", required=True, parser_class=_Parser)
    sp = leaf(eksub, "set", cmd_ek_ca_set, "trust the EK CAs of a PEM bundle (replaces the current ones)")
    sp.add_argument("file", metavar="FILE")
    leaf(eksub, "show", cmd_ek_ca_show, "show the trusted EK CAs")
    leaf(eksub, "clear", cmd_ek_ca_clear, "trust no EK CA (no new enrollments)")

    pol = sub.add_parser("policy", help="platform policies")
    psub = pol.add_subparsers(dest="subcommand", required=True, parser_class=_Parser)
    sp = leaf(
        psub, "clone-quarantine", cmd_policy,
        "quarantine an appliance that shows clone signs (default on); no argument shows the setting",
    )
    sp.add_argument("value", nargs="?", choices=["on", "off"])

    hb = sub.add_parser("heartbeat", help="how often appliances report, when they count as missing")
    hsub = hb.add_subparsers(dest="subcommand", required=True, parser_class=_Parser)
    sp = leaf(hsub, "set", cmd_heartbeat_set, "set the heartbeat interval and/or missing threshold")
    sp.add_argument("--interval", type=_interval, metavar="SECONDS")
    sp.add_argument("--missing-after", type=_missing_after, metavar="N")
    leaf(hsub, "show", cmd_heartbeat_show, "show the heartbeat policy")

    ah = sub.add_parser("alert-hook", help="command run on heartbeat state changes")
    ahsub = ah.add_subparsers(dest="subcommand", required=True, parser_class=_Parser)
    sp = leaf(ahsub, "set", cmd_alert_hook_set, "set the alert hook (run without a shell, event JSON on stdin)")
    sp.add_argument("hook_command", metavar="COMMAND", help="program and arguments, one string")
    sp.add_argument("--timeout", type=_hook_timeout, default=health.DEFAULT_HOOK_TIMEOUT, metavar="SECONDS")
    leaf(ahsub, "show", cmd_alert_hook_show, "show the alert hook")
    leaf(ahsub, "clear", cmd_alert_hook_clear, "remove the alert hook")

    job = sub.add_parser("job", help="manage jobs")
    jsub = job.add_subparsers(dest="subcommand", required=True, parser_class=_Parser)
    sp = leaf(jsub, "add", cmd_job_add, "queue a scan job; prints its id")
    sp.add_argument("appliance", type=_name)
    sp.add_argument("--targets", required=True, help="comma list of IPs, CIDRs, hostnames")
    sp.add_argument("--ports", required=True, help="comma list of ports and ranges")
    sp.add_argument("--engine", choices=list(api.ENGINES), default=api.ENGINE_BUILTIN)
    sp.add_argument("--credential", type=_name, help="name of a credential of this appliance")
    sp = leaf(jsub, "list", cmd_job_list, "list jobs")
    sp.add_argument("--appliance", type=_name)
    sp.add_argument("--json", action="store_true")

    res = sub.add_parser("results", help="read results")
    rsub = res.add_subparsers(dest="subcommand", required=True, parser_class=_Parser)
    sp = leaf(rsub, "show", cmd_results_show, "show a job's result")
    sp.add_argument("job", type=_job_id)
    sp.add_argument("--json", action="store_true")

    cred = sub.add_parser("credential", help="manage sealed credentials")
    csub = cred.add_subparsers(dest="subcommand", required=True, parser_class=_Parser)
    sp = leaf(csub, "add", cmd_credential_add, "store a credential sealed with scanner-seal")
    sp.add_argument("name", type=_name)
    sp.add_argument("--appliance", type=_name, required=True)
    sp.add_argument("--sealed", required=True, metavar="FILE", help="sealed blob ('-': stdin)")
    sp = leaf(csub, "list", cmd_credential_list, "list an appliance's credential names")
    sp.add_argument("--appliance", type=_name, required=True)

    sl = sub.add_parser("syslog", help="remote syslog target told to appliances")
    ssub = sl.add_subparsers(dest="subcommand", required=True, parser_class=_Parser)
    sp = leaf(ssub, "set", cmd_syslog_set, "set the RFC 5425 (TLS) syslog target")
    sp.add_argument("--host", required=True)
    sp.add_argument("--port", type=_port, required=True)
    sp.add_argument("--ca", required=True, metavar="FILE", help="CA certificate (PEM)")
    leaf(ssub, "show", cmd_syslog_show, "show the syslog target")
    leaf(ssub, "clear", cmd_syslog_clear, "remove the syslog target")

    leaf(sub, "crl", cmd_crl, "print the revocation list as an X.509 CRL (PEM)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `scanner-platform`; returns the exit code."""
    os.umask(0o077)  # database, WAL and anything else we create: owner only
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        return int(args.func(args))
    except CliError as e:
        return _fail(args, str(e), e.code)
    except db.NotFound as e:
        return _fail(args, str(e), EXIT_NOT_FOUND)
    except db.Conflict as e:
        return _fail(args, str(e), EXIT_CONFLICT)
    except db.OutOfScope as e:
        return _fail(args, str(e), EXIT_SCOPE)
    except (state.StateError, db.StorageError, ca.CAError) as e:
        return _fail(args, str(e), EXIT_STATE)
    except KeyboardInterrupt:
        return _fail(args, "interrupted", EXIT_FAILURE)
    except Exception as e:  # noqa: BLE001 — last resort: still one line unless --debug
        return _fail(args, f"unexpected {type(e).__name__}: {e}; rerun with --debug", EXIT_FAILURE)


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    if args.debug:
        logging.getLogger("scanner-platform").exception("error")
    print(f"{PROG}: {message}", file=sys.stderr)
    return code
