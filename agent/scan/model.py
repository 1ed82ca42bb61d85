"""Scan options, per-port results and the result document (shape: protocol.api R_*). Pure."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Final

from protocol import api

STATE_OPEN: Final = "open"
STATE_CLOSED: Final = "closed"
STATE_FILTERED: Final = "filtered"

AUTH_ACCEPTED: Final = "accepted"
AUTH_REJECTED: Final = "rejected"
AUTH_FAILED: Final = "error"

MAX_HOSTS: Final = 65536
MAX_PROBES: Final = 1 << 20


@dataclass(frozen=True)
class ScanOptions:
    """Bounds of a scan: concurrency and timeouts (seconds)."""

    concurrency: int = 256
    connect_timeout: float = 2.0
    banner_timeout: float = 1.5
    resolve_timeout: float = 5.0
    nmap_timeout: float = 600.0

    def __post_init__(self) -> None:
        if not 1 <= self.concurrency <= 4096:
            raise ValueError("concurrency must be 1-4096")
        for name in ("connect_timeout", "banner_timeout", "resolve_timeout", "nmap_timeout"):
            if not 0 < getattr(self, name) <= 3600:
                raise ValueError(f"{name} must be in (0, 3600] seconds")


@dataclass
class PortResult:
    """What one (address, port) probe found."""

    port: int
    state: str
    service: str = ""
    banner: str = ""
    guess: str = "none"
    auth: str | None = None
    auth_banner: str | None = None
    needs_auth: bool = False
    tls: bool = False  # the service spoke TLS (the probe's handshake succeeded)
    cert_sha256: str = ""  # SHA-256 of the certificate the probe saw (hex), for pinning
    inventory: dict[str, str] | None = None  # authenticated SSH: command -> output

    def to_json(self) -> dict[str, Any]:
        """Result-document form (only fields with meaning for this port)."""
        doc: dict[str, Any] = {
            api.R_PORT: self.port,
            api.R_STATE: self.state,
            api.R_SERVICE: self.service,
            api.R_BANNER: self.banner,
            "guess": self.guess,
        }
        if self.tls:
            doc["tls"] = True
            doc["cert_sha256"] = self.cert_sha256
        if self.inventory is not None:
            doc["inventory"] = dict(self.inventory)
        if self.auth is not None:
            doc["auth"] = self.auth
            doc["auth_banner"] = self.auth_banner or ""
            if self.auth_banner:
                # What a logged-in user sees is the more telling banner; keep both.
                doc["unauthenticated_banner"] = self.banner
                doc[api.R_BANNER] = f"[auth {self.auth}] {self.auth_banner}"
            else:  # refused by the scope, or no login: say so where operators look
                doc[api.R_BANNER] = f"[auth {self.auth}] {self.banner}"
        return doc


@dataclass
class HostResult:
    """Every probed port of one address (open ports are reported, others counted)."""

    target: str
    address: str
    ports: list[PortResult] = field(default_factory=list)
    error: str | None = None
    # Ports an engine summarised without listing them (nmap's <extraports>).
    extra_closed: int = 0
    extra_filtered: int = 0

    def count(self, state: str) -> int:
        """Ports in *state*, listed or summarised."""
        listed = sum(p.state == state for p in self.ports)
        extra = {STATE_CLOSED: self.extra_closed, STATE_FILTERED: self.extra_filtered}
        return listed + extra.get(state, 0)

    def to_json(self) -> dict[str, Any]:
        """Result-document form: open ports listed, closed/filtered counted."""
        doc: dict[str, Any] = {
            api.R_TARGET: self.target,
            api.R_ADDRESS: self.address,
            api.R_PORTS: [p.to_json() for p in sorted(self.ports, key=lambda p: p.port)
                          if p.state == STATE_OPEN],
            "closed": self.count(STATE_CLOSED),
            "filtered": self.count(STATE_FILTERED),
        }
        if self.error:
            doc["error"] = self.error
        return doc


def result_document(
    job_id: str, engine: str, started: float, finished: float, hosts: list[HostResult]
) -> bytes:
    """The uploaded result: canonical JSON bytes (sorted keys, so the digest is stable)."""
    doc = {
        "job": job_id,
        "engine": engine,
        "started": round(started, 3),
        "finished": round(finished, 3),
        api.R_HOSTS: [h.to_json() for h in hosts],
        "summary": {
            "hosts": len(hosts),
            "open": sum(h.count(STATE_OPEN) for h in hosts),
            "probes": sum(len(h.ports) + h.extra_closed + h.extra_filtered for h in hosts),
        },
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
