"""The customer's scope of a sealed credential: where the secret may be sent. Pure.

A scope is sealed together with the secret (sealing format v2), so neither the platform nor
anyone on the network can move it; a copy travels in the clear in the blob's header so that
the platform can refuse jobs outside it, but only the sealed copy is authoritative: the
scan child decides from it, per (address, port, protocol), before any secret byte leaves.

Canonical form: compact JSON with sorted keys, fields

    targets    list of IPs, CIDRs (normalised) and hostnames (lowercase); hostnames match
               the addresses they resolve to at scan time
    ports      port spec ("22,443,8000-8100")
    protocols  subset of PROTOCOLS
    expires    UTC epoch seconds or null
    cleartext  bool: HTTP Basic may travel without TLS (default false); void when
               tls_sha256 is non-empty (a pin means TLS: see Scope.sends_cleartext)
    tls_sha256 list of lowercase hex SHA-256 of the DER certificate; non-empty = pinned
    ssh_sha256 list of lowercase hex SHA-256 of the SSH host key blob; non-empty = pinned
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Any, Final

from protocol import api

PROTO_HTTP_BASIC: Final = "http-basic"
PROTO_SSH: Final = "ssh"
PROTOCOLS: Final = (PROTO_HTTP_BASIC, PROTO_SSH)

# Result-document outcomes for a port where the credential was NOT used (nothing sent).
OUT_OF_SCOPE: Final = "credential_out_of_scope"
NEEDS_TLS: Final = "credential_needs_tls"
EXPIRED: Final = "credential_expired"
CERT_MISMATCH: Final = "credential_cert_mismatch"

MAX_SCOPE_BYTES: Final = 16 * 1024
MAX_TARGETS: Final = 256
MAX_PINS: Final = 16
_LABEL: Final = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_HOST_RE: Final = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")
_HEX64: Final = re.compile(r"^[0-9a-f]{64}$")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ScopeError(ValueError):
    """A scope is malformed (the message names the bad part, never a secret)."""


def _norm_target(raw: str) -> str:
    t = raw.strip().lower()
    try:
        return str(ipaddress.ip_address(t))
    except ValueError:
        pass
    if "/" in t:
        try:
            return str(ipaddress.ip_network(t, strict=False))
        except ValueError:
            raise ScopeError(f"scope target {raw!r} is not a valid CIDR") from None
    if not _HOST_RE.match(t):
        raise ScopeError(f"scope target {raw!r} is neither an IP, a CIDR nor a hostname")
    return t


def _norm_pin(raw: str, what: str) -> str:
    pin = raw.strip().lower().replace(":", "")
    if not _HEX64.match(pin):
        raise ScopeError(f"{what} pin {raw!r} is not a SHA-256 in hex")
    return pin


@dataclass(frozen=True)
class Scope:
    """Where a credential may be used. Build with Scope.build(); compare with allows()."""

    targets: tuple[str, ...]
    ports: str
    protocols: tuple[str, ...]
    expires: float | None = None
    cleartext: bool = False
    tls_sha256: tuple[str, ...] = ()
    ssh_sha256: tuple[str, ...] = ()

    @classmethod
    def build(
        cls,
        targets: list[str],
        ports: str,
        protocols: list[str],
        expires: float | None = None,
        cleartext: bool = False,
        tls_sha256: list[str] | None = None,
        ssh_sha256: list[str] | None = None,
    ) -> Scope:
        """Validate and normalise; raise ScopeError."""
        if not targets or len(targets) > MAX_TARGETS:
            raise ScopeError(f"scope needs 1-{MAX_TARGETS} targets")
        norm = tuple(sorted({_norm_target(t) for t in targets}))
        try:
            port_spec = api.format_port_spec(api.parse_port_spec(ports))
        except api.SpecError as e:
            raise ScopeError(f"scope ports: {e}") from None
        protos = tuple(sorted(set(protocols)))
        if not protos or any(p not in PROTOCOLS for p in protos):
            raise ScopeError(f"scope protocols must be among {', '.join(PROTOCOLS)}")
        if expires is not None and not (0 < expires < 1e11):
            raise ScopeError("scope expiry must be a UTC epoch time")
        tls = tuple(sorted({_norm_pin(p, "TLS") for p in tls_sha256 or []}))
        ssh = tuple(sorted({_norm_pin(p, "SSH host key") for p in ssh_sha256 or []}))
        if len(tls) > MAX_PINS or len(ssh) > MAX_PINS:
            raise ScopeError(f"at most {MAX_PINS} pins of each kind")
        return cls(norm, port_spec, protos, expires, bool(cleartext), tls, ssh)

    # --- encoding ---

    def to_json(self) -> dict[str, Any]:
        """The canonical JSON object."""
        return {
            "targets": list(self.targets),
            "ports": self.ports,
            "protocols": list(self.protocols),
            "expires": self.expires,
            "cleartext": self.cleartext,
            "tls_sha256": list(self.tls_sha256),
            "ssh_sha256": list(self.ssh_sha256),
        }

    def to_bytes(self) -> bytes:
        """Canonical bytes (what is sealed and what the blob header shows)."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, doc: Any) -> Scope:
        """Parse and re-validate a scope object; raise ScopeError."""
        if not isinstance(doc, dict):
            raise ScopeError("scope is not a JSON object")
        try:
            expires = doc.get("expires")
            if expires is not None and (isinstance(expires, bool) or not isinstance(expires, int | float)):
                raise ScopeError("scope expiry is not a number")
            cleartext = doc.get("cleartext", False)
            if not isinstance(cleartext, bool):
                raise ScopeError("scope cleartext is not a boolean")
            lists = {}
            for key in ("targets", "protocols", "tls_sha256", "ssh_sha256"):
                value = doc.get(key, [])
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ScopeError(f"scope {key} is not a list of strings")
                lists[key] = value
            ports = doc.get("ports")
            if not isinstance(ports, str):
                raise ScopeError("scope ports is not a string")
            return cls.build(
                lists["targets"], ports, lists["protocols"],
                float(expires) if expires is not None else None, cleartext,
                lists["tls_sha256"], lists["ssh_sha256"],
            )  # fmt: skip
        except (TypeError, OverflowError):
            raise ScopeError("scope has fields of the wrong type") from None

    @classmethod
    def from_bytes(cls, data: bytes | bytearray) -> Scope:
        """Parse canonical bytes; raise ScopeError."""
        if len(data) > MAX_SCOPE_BYTES:
            raise ScopeError(f"scope larger than {MAX_SCOPE_BYTES} bytes")
        try:
            doc = json.loads(bytes(data))
        except (ValueError, UnicodeDecodeError):
            raise ScopeError("scope is not JSON") from None
        return cls.from_json(doc)

    # --- matching ---

    @property
    def sends_cleartext(self) -> bool:
        """Whether HTTP Basic may travel without TLS under this scope.

        A TLS pin says "only to this certificate"; a cleartext port has no certificate, and
        an active attacker in front of the pinned service can answer the scan's probe in
        plain HTTP. So pins void ``cleartext``: the pair is refused by ``scanner-seal`` but
        may still arrive sealed (older sealers, other tools), and must then mean TLS only.
        """
        return self.cleartext and not self.tls_sha256

    def networks(self) -> list[Network]:
        """The IP and CIDR targets as networks (a single IP is a /32 or /128)."""
        out: list[Network] = []
        for t in self.targets:
            try:
                out.append(ipaddress.ip_network(t, strict=False))
            except ValueError:
                continue  # a hostname
        return out

    def hostnames(self) -> list[str]:
        """The hostname targets (resolved by the scan child at use time)."""
        return [t for t in self.targets if not _is_ip_or_cidr(t)]

    def covers_job_target(self, target: str) -> bool:
        """Platform-side check: does a job target lie inside the scope's targets?

        An IP must be inside one of the scope's networks, a CIDR entirely inside one, a
        hostname must be one of the scope's hostnames. The platform cannot know what a
        name resolves to at scan time; the appliance re-checks every address anyway.
        """
        t = target.strip().lower()
        try:
            net = ipaddress.ip_network(t, strict=False)
        except ValueError:
            return t in self.hostnames()
        return any(
            net.version == n.version and net.subnet_of(n)  # type: ignore[arg-type]
            for n in self.networks()
        )

    def decide(
        self,
        address: str,
        resolved: dict[str, set[str]],
        port: int,
        protocol: str,
        tls: bool,
        now: float,
    ) -> str | None:
        """None when the credential may be sent to (address, port, protocol), else why not.

        *resolved* maps each scope hostname to the addresses it resolves to now. The TLS
        certificate pin is checked on the very connection that carries the secret, not here;
        a pinned scope never sends HTTP Basic without TLS, whatever ``cleartext`` says.
        """
        if protocol not in self.protocols:
            return OUT_OF_SCOPE
        if not any(lo <= port <= hi for lo, hi in api.parse_port_spec(self.ports)):
            return OUT_OF_SCOPE
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return OUT_OF_SCOPE
        in_nets = any(ip in n for n in self.networks())
        in_names = any(str(ip) in resolved.get(h, set()) for h in self.hostnames())
        if not (in_nets or in_names):
            return OUT_OF_SCOPE
        if self.expires is not None and now >= self.expires:
            return EXPIRED
        if protocol == PROTO_HTTP_BASIC and not tls and not self.sends_cleartext:
            return NEEDS_TLS
        return None


def pin_matches(fingerprint: str, pins: tuple[str, ...]) -> bool:
    """Constant-time membership of a hex SHA-256 in a scope's pins (no pins: anything matches).

    Used by both credential checks (TLS certificate, SSH host key) on the very connection
    that would carry the secret.
    """
    if not pins:
        return True
    ok = False
    for pin in pins:
        ok |= hmac.compare_digest(fingerprint.encode(), pin.encode())
    return ok


def _is_ip_or_cidr(t: str) -> bool:
    try:
        ipaddress.ip_network(t, strict=False)
    except ValueError:
        return False
    return True
