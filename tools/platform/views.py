"""What `scanner-platform` prints: tables for people, JSON documents for scripts. Pure:
every function takes what the command read from storage and returns text or a document.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from protocol import api
from tools.platform import db, health


def ts(value: float | None) -> str:
    """A UTC timestamp, or "-"."""
    if value is None:
        return "-"
    return dt.datetime.fromtimestamp(value, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def printable(text: str, width: int) -> str:
    """*text* with control characters replaced and cut to *width* (it may come from an appliance)."""
    clean = "".join(ch if ch.isprintable() else "." for ch in text)
    return clean if len(clean) <= width else clean[: width - 1] + "~"


def table(rows: list[list[str]]) -> str:
    """Rows (the first one the header) as left-aligned columns."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def age(value: float | None, now: float) -> str:
    """How long ago *value* was, roughly ("never" for None)."""
    if value is None:
        return "never"
    elapsed = max(0.0, now - value)
    if elapsed < 120:
        return f"{elapsed:.1f}s ago"
    if elapsed < 7200:
        return f"{elapsed / 60:.0f}m ago"
    return f"{elapsed / 3600:.0f}h ago"


@dataclass(frozen=True)
class Fleet:
    """What `appliance list` read: appliances, clone states, heartbeats, the policy, the time."""

    apps: list[db.Appliance]
    clones: dict[int, db.CloneState]
    healths: dict[str, db.Health]  # by appliance name
    policy: health.Policy
    now: float
    attestations: dict[int, db.Attestation] = field(default_factory=dict)  # by appliance id
    keys: dict[int, db.KeyState] | None = None  # volume-key scheme and epochs, by appliance id

    def volume_key(self, a: db.Appliance) -> str:
        """The volume key in a few words: "passphrase" (platform-held, not yet migrated),
        "split epoch N" (two shares), "+ N pending" (migration or rotation waiting for the
        appliance's next boot); "destroyed" after deactivation, "-" before activation."""
        k = (self.keys or {}).get(a.id)
        if a.state == db.STATE_DEACTIVATED:
            return "destroyed"
        if a.state != db.STATE_ACTIVE or k is None:
            return "-"
        text = k.scheme if k.epoch is None else f"{k.scheme} epoch {k.epoch}"
        return text if k.pending_epoch is None else f"{text} + {k.pending_epoch} pending"

    def derived(self, name: str) -> health.Derived:
        """The appliance's health state now (quarantine and deactivation override heartbeats)."""
        return health.derive(self.healths[name], self.policy, self.now)


def appliance_docs(fleet: Fleet) -> list[dict[str, Any]]:
    """`appliance list --json`: one document per appliance."""
    docs = []
    for a in fleet.apps:
        c = fleet.clones.get(a.id)
        derived = fleet.derived(a.name)
        docs.append(
            {
                "name": a.name,
                "state": a.state,
                "health": derived.state,
                "missed_beats": derived.missed,
                "last_seen": fleet.healths[a.name].last_seen,
                "heartbeat": fleet.healths[a.name].status,
                "created_at": a.created_at,
                "activated_at": a.activated_at,
                "deactivated_at": a.deactivated_at,
                "code_expires": a.code_expires if a.state == db.STATE_PENDING else None,
                "cert_serial": a.cert_serial,
                "quarantined": c is not None and c.quarantined_since is not None,
                "quarantined_since": c.quarantined_since if c else None,
                "quarantine_reason": c.quarantine_reason if c else None,
                "boot_counter": c.boot_counter if c else None,
                "keystore": c.keystore if c else None,
                "last_boot": c.last_boot if c else None,
                "attestation": attestation(c, rec := fleet.attestations.get(a.id)),
                "pcr_state": rec.pcr_state if rec else None,
                "last_verified_boot": rec.last_verified if rec else None,
                **_key_doc(fleet, a),
            }
        )
    return docs


def attestation(c: db.CloneState | None, rec: db.Attestation | None) -> str | None:
    """``attested`` (enrolled TPM, current session verified), ``enrolled`` (TPM enrolled, no
    verified session yet), ``claimed`` (a tpm keystore reported, nothing proven), ``none``
    (file keystore) or None (never booted)."""
    if rec is not None and rec.state == db.ATTEST_ATTESTED:
        return "attested" if c is not None and c.attested else "enrolled"
    if c is None or c.keystore is None:
        return None
    return "claimed" if c.keystore == "tpm" else "none"


def keystore_label(c: db.CloneState | None, rec: db.Attestation | None) -> str:
    """The KEYSTORE column: ``tpm (attested)``, ``tpm (claimed)``, ``file (unattested)``..."""
    kind = c.keystore if c is not None else None
    verdict = attestation(c, rec)
    if kind is None:
        return "tpm (enrolled)" if verdict == "enrolled" else "-"
    if kind == "file":
        return "file (unattested)"
    mismatch = rec is not None and rec.pcr_state == db.PCR_MISMATCH
    return f"{kind} ({verdict}{', PCR mismatch' if mismatch else ''})"


def sessions_table(rows: list[db.SessionRow]) -> str:
    """`appliance sessions`: the kept boot sessions, newest first."""
    out = [["SESSION", "BOOT COUNTER", "KEYSTORE", "EVIDENCE", "OPENED", "CURRENT"]]
    for r in rows:
        out.append([
            r.public_id or "-", str(r.boot_counter), r.keystore, "attested" if r.attested else "claimed",
            ts(r.created_at), "yes" if r.current else "",
        ])  # fmt: skip
    return table(out)


def baseline_table(name: str, rec: db.Attestation) -> str:
    """`appliance baseline`: the recorded PCR values next to the last refused quote's."""
    baseline = rec.pcr_values or ()
    pending = rec.pending_pcr_values
    rows = [["PCR", "BASELINE", "LAST REFUSED QUOTE" if pending else ""]]
    for i, pcr in enumerate(rec.pcrs):
        new = pending[i] if pending else ""
        mark = " (changed)" if pending and new != baseline[i] else ""
        rows.append([str(pcr), baseline[i], new + mark])
    head = f"appliance {name}: PCR baseline (SHA-256 bank), state {rec.pcr_state}"
    return head + "\n" + table(rows)
def _key_doc(fleet: Fleet, a: db.Appliance) -> dict[str, Any]:
    k = (fleet.keys or {}).get(a.id)
    active = a.state == db.STATE_ACTIVE and k is not None
    return {
        "key_scheme": k.scheme if active and k else None,
        "key_epoch": k.epoch if active and k else None,
        "key_pending_epoch": k.pending_epoch if active and k else None,
    }


def appliance_table(fleet: Fleet) -> str:
    """`appliance list`: one view of lifecycle STATE, HEALTH (heartbeats, with quarantine and
    deactivation overriding them), the heartbeat's facts and the boot sessions' (clone
    detection); then one line per quarantined appliance saying why."""
    rows = [
        [
            "NAME", "STATE", "HEALTH", "LAST SEEN", "UPTIME", "JOBS OK/FAILED", "KEYSTORE", "BOOTS",
            "LAST BOOT", "LAST VERIFIED BOOT", "ACTIVATED", "CERT SERIAL", "VOLUME KEY",
        ]
    ]  # fmt: skip
    for a in fleet.apps:
        c = fleet.clones.get(a.id)
        status = fleet.healths[a.name].status or {}
        uptime = status.get(api.HB_UPTIME)
        jobs = f"{status.get(api.HB_JOBS_DONE, '-')}/{status.get(api.HB_JOBS_FAILED, '-')}" if status else "-"
        rows.append(
            [
                a.name,
                a.state,
                fleet.derived(a.name).state,
                age(fleet.healths[a.name].last_seen, fleet.now),
                f"{uptime:.0f}s" if isinstance(uptime, int | float) else "-",
                jobs,
                keystore_label(c, rec := fleet.attestations.get(a.id)),
                str(c.boot_counter) if c and c.boot_counter is not None else "-",
                ts(c.last_boot if c else None),
                ts(rec.last_verified if rec else None),
                ts(a.activated_at),
                a.cert_serial or "-",
                fleet.volume_key(a),
            ]
        )
    lines = [table(rows)]
    for a in fleet.apps:
        c = fleet.clones.get(a.id)
        if c is not None and c.quarantined_since is not None and a.state == db.STATE_ACTIVE:
            why = printable(c.quarantine_reason or "", 200)
            lines.append(f"{a.name}: quarantined since {ts(c.quarantined_since)}: {why}")
        rec = fleet.attestations.get(a.id)
        if rec is not None and rec.pcr_state == db.PCR_MISMATCH and a.state == db.STATE_ACTIVE:
            lines.append(
                f"{a.name}: boot refused since {ts(rec.pending_at)}: PCR values differ from the baseline "
                f"(see 'scanner-platform appliance baseline {a.name}')"
            )
    return "\n".join(lines)


def job_doc(j: db.JobRow) -> dict[str, Any]:
    """`job list --json`: one job (never its sealed credential)."""
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


def job_table(jobs: list[db.JobRow]) -> str:
    """`job list`: one row per job."""
    rows = [["ID", "APPLIANCE", "STATE", "ATTEMPTS", "TARGETS", "PORTS", "ENGINE", "CREDENTIAL", "RESULT", "PROGRESS"]]
    rows += [
        [
            str(j.id),
            j.appliance,
            j.state,
            str(j.attempts),
            printable(",".join(j.targets), 40),
            printable(j.ports, 30),
            j.engine,
            j.credential_name or "-",
            (j.result_sha256 or "-")[:12],
            printable(j.progress or "-", 40),
        ]
        for j in jobs
    ]
    return table(rows)


def result_table(doc: Any) -> str | None:
    """A scan result document as a table of hosts and ports; None if it is not one."""
    if not isinstance(doc, dict) or not isinstance(doc.get(api.R_HOSTS), list):
        return None
    rows = [["TARGET", "ADDRESS", "PORT", "STATE", "SERVICE", "BANNER"]]
    for host in doc[api.R_HOSTS]:
        if not isinstance(host, dict):
            continue
        target = printable(str(host.get(api.R_TARGET, "-")), 40)
        address = printable(str(host.get(api.R_ADDRESS, "-")), 40)
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
                        printable(str(p.get(api.R_STATE, "-")), 12),
                        printable(str(p.get(api.R_SERVICE) or "-"), 20),
                        printable(str(p.get(api.R_BANNER) or "-"), 60),
                    ]
                )
    return table(rows)
