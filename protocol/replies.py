"""What `protocol.client.PlatformClient` raises and returns, and the checks that turn the
platform's response bodies into those types.

Pure: no I/O, no connection state; the client (`protocol.client`, which re-exports every
public name here) owns the connections. A response that does not have the documented shape
is a PlatformError with reason "protocol"; messages never quote keys, codes or bodies.
"""

from __future__ import annotations

import base64
import binascii
import json
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from protocol import api, http1

# --- errors -----------------------------------------------------------------------------


class PlatformError(Exception):
    """The platform refused a request or could not be reached.

    ``status`` is the HTTP status (None when no response arrived), ``reason`` a
    `protocol.api` REASON_* constant or one of "tls", "unavailable", "proxy", "protocol".
    """

    def __init__(self, status: int | None, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status!r}, reason={self.reason!r})"


class DeactivatedError(PlatformError):
    """The platform answered 403 ``deactivated``: this appliance must erase its keys and stop."""


class QuarantinedError(PlatformError):
    """The platform answered 403 ``quarantined``: it suspects a clone; an operator must clear it."""


class PlatformTLSError(PlatformError):
    """TLS failed: untrusted server certificate, hostname mismatch, refused client cert, etc."""


class PlatformUnavailableError(PlatformError):
    """No answer: connection refused, timeout, or the connection broke. Retry later."""


class DigestMismatchError(PlatformError):
    """The platform's acknowledged digest differs from what was sent (or it refused the body)."""


# --- data returned ----------------------------------------------------------------------


@dataclass(frozen=True)
class SyslogTarget:
    """Remote syslog (RFC 5425, TLS) target the appliance should forward scan logs to."""

    host: str
    port: int
    ca_pem: bytes = field(repr=False)


@dataclass(frozen=True)
class ActivationResult:
    """What activation returns: the client certificate, the CA, the syslog target."""

    appliance: str
    certificate_pem: bytes
    ca_pem: bytes
    syslog: SyslogTarget | None


@dataclass(frozen=True)
class PlatformConfig:
    """Per-account configuration the appliance is told about."""

    syslog: SyslogTarget | None
    heartbeat_interval: float | None = None  # seconds; None: the platform sets none


@dataclass(frozen=True)
class SealedShare:
    """A sealed volume-key part: the legacy passphrase (epoch 0) or a platform share."""

    epoch: int
    sealed: bytes = field(repr=False)


@dataclass(frozen=True)
class VolumeKeyOffer:
    """GET /v1/volume-key: the current key part (api.KEY_SCHEME_*) and any pending share."""

    scheme: str
    current: SealedShare
    pending: SealedShare | None


@dataclass(frozen=True)
class Job:
    """A leased job. ``credential`` is a sealed blob (context b"credential") or None."""

    id: str
    targets: tuple[str, ...]
    ports: str  # port spec, e.g. "22,80,8000-8100"; see api.parse_port_spec / expand_ports
    engine: str  # api.ENGINE_BUILTIN or api.ENGINE_NMAP
    credential: bytes | None = field(repr=False)
    credential_name: str | None
    lease_expires: float  # platform UTC epoch seconds
    attempt: int  # 1 on first hand-out, more when re-offered after a lease expired


# --- connection failures ----------------------------------------------------------------


def is_busy(body: bytes) -> bool:
    """Whether a 503 answer's body says "busy" (the platform asks to come back soon)."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and data.get(api.F_REASON) == api.REASON_BUSY


def retry_after(headers: Mapping[str, str]) -> float:
    """A busy answer's Retry-After, clamped to 1-5 s."""
    try:
        return min(5.0, max(1.0, float(headers.get("retry-after", "1"))))
    except ValueError:
        return 1.0


def _tls_message(exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed: {exc.verify_message}"
    return f"TLS failed: {exc.reason or type(exc).__name__}"


def broken(exc: http1.StreamBroken, what: str) -> PlatformError:
    """The one mapping of a broken connection: TLS (a refused certificate, a protocol
    version, the server's alert) or, without a TLS cause, unavailable (*what* broke)."""
    if exc.tls_error is not None:
        return PlatformTLSError(None, "tls", _tls_message(exc.tls_error))
    return PlatformUnavailableError(None, "unavailable", what)


# --- response checks ---


def b64decode(value: object, what: str) -> bytes:
    """The bytes of a base64 response field named *what*."""
    if not isinstance(value, str):
        raise PlatformError(None, "protocol", f"platform response: {what} is not a string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise PlatformError(None, "protocol", f"platform response: {what} is not base64") from None


def syslog_from(value: object) -> SyslogTarget | None:
    """The syslog target of a response (None: none set)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise PlatformError(None, "protocol", "platform response: syslog is not an object")
    host, port, ca = value.get(api.F_HOST), value.get(api.F_PORT), value.get(api.F_CA)
    if not isinstance(host, str) or not isinstance(port, int) or not isinstance(ca, str):
        raise PlatformError(None, "protocol", "platform response: syslog fields are malformed")
    return SyslogTarget(host=host, port=port, ca_pem=ca.encode())


def epoch_from(value: object) -> int:
    """A volume-key epoch of a response (1..2^32-1)."""
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value < 2**32:
        raise PlatformError(None, "protocol", "platform response: key epoch is not an integer in 1..2^32-1")
    return value


def share_from(value: object) -> SealedShare:
    """A sealed share object {epoch, sealed} of a response."""
    if not isinstance(value, dict):
        raise PlatformError(None, "protocol", "platform response: pending share is not an object")
    return SealedShare(epoch_from(value.get(api.F_EPOCH)), b64decode(value.get(api.F_SEALED), "sealed share"))


def interval_from(value: object) -> float | None:
    """The heartbeat interval of a response, clamped to the api bounds (None: none set)."""
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise PlatformError(None, "protocol", "platform response: heartbeat_interval is not a number")
    return min(max(float(value), api.MIN_HEARTBEAT_INTERVAL), api.MAX_HEARTBEAT_INTERVAL)


def job_from(job: Mapping[str, Any]) -> Job:
    """A leased job from the ``job`` object of GET PATH_NEXT_JOB."""
    jid, targets, ports = job.get(api.F_ID), job.get(api.F_TARGETS), job.get(api.F_PORTS)
    engine, lease, attempt = (
        job.get(api.F_ENGINE),
        job.get(api.F_LEASE_EXPIRES),
        job.get(api.F_ATTEMPT),
    )
    if (
        not isinstance(jid, str)
        or not isinstance(targets, list)
        or not all(isinstance(t, str) for t in targets)
        or not isinstance(ports, str)
        or not isinstance(engine, str)
        or not isinstance(lease, int | float)
        or not isinstance(attempt, int)
    ):
        raise PlatformError(None, "protocol", "platform response: job fields are malformed")
    cred = job.get(api.F_CREDENTIAL)
    sealed: bytes | None = None
    cred_name: str | None = None
    if cred is not None:
        if not isinstance(cred, dict) or not isinstance(cred.get(api.F_NAME), str):
            raise PlatformError(None, "protocol", "platform response: credential malformed")
        cred_name = cred[api.F_NAME]
        sealed = b64decode(cred.get(api.F_SEALED), "sealed credential")
    return Job(
        id=jid,
        targets=tuple(targets),
        ports=ports,
        engine=engine,
        credential=sealed,
        credential_name=cred_name,
        lease_expires=float(lease),
        attempt=attempt,
    )


def json_object(status: int, body: bytes) -> dict[str, Any]:
    """The JSON object of a response body (an empty body: {}); PlatformError("protocol") otherwise."""
    try:
        data = json.loads(body) if body else {}
    except (ValueError, UnicodeDecodeError):
        raise PlatformError(status, "protocol", f"platform answered {status} with a non-JSON body") from None
    if not isinstance(data, dict):
        raise PlatformError(status, "protocol", "platform response is not a JSON object")
    return data


def error_for(status: int, body: bytes) -> PlatformError:
    """The error an error response (status >= 400) means, from its body's reason and text."""
    reason, text = "protocol", ""
    try:
        data = json.loads(body)
        if isinstance(data, dict):
            reason = str(data.get(api.F_REASON, reason))[:64]
            text = str(data.get(api.F_ERROR, ""))[:200]
    except (ValueError, UnicodeDecodeError):
        pass
    message = f"platform refused the request: {status} {reason}" + (f" ({text})" if text else "")
    if status == 403 and reason == api.REASON_DEACTIVATED:
        return DeactivatedError(status, reason, "platform says this appliance is deactivated")
    if status == 403 and reason == api.REASON_QUARANTINED:
        return QuarantinedError(status, reason, message)
    if reason == api.REASON_DIGEST_MISMATCH:
        return DigestMismatchError(status, reason, message)
    return PlatformError(status, reason, message)
