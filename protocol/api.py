"""The wire contract between the platform and the appliance: paths, fields, reasons, limits.

Pure: no I/O. Both `tools.platform` (server) and `protocol.client` (appliance) import these
names so that the two sides cannot drift apart. `docs/platform.md` documents the same
contract for people writing another implementation.

Conventions:
- Every request and response body is JSON (UTF-8, ``application/json``) except the result
  upload, whose body is the raw result document (``application/octet-stream``).
- Every error response is ``{"reason": REASON, "error": "human readable text"}`` with a 4xx or
  5xx status; clients branch on ``reason`` (machine readable), never on ``error``.
- Binary values (sealed blobs, keys) travel as standard base64 with padding.
"""

from __future__ import annotations

import hashlib
import re
from typing import Final

API_VERSION: Final = "v1"

# --- endpoint paths ---------------------------------------------------------------------
PATH_TIME: Final = "/v1/time"  # GET; client certificate optional
PATH_ACTIVATE: Final = "/v1/activate"  # POST; no client certificate needed
PATH_VOLUME_KEY: Final = "/v1/volume-key"  # GET; mutual TLS + session
# Split volume key (two shares; see agent/volumekey.py). POST {} ; mutual TLS + session ->
# the pending share {"epoch": N, "sealed": ...}: created on the first call (the migration of
# an appliance whose volume opens with a platform-held passphrase), or by the operator's
# `appliance rotate-volume-key`; repeating the call returns the same pending share.
PATH_VOLUME_KEY_NEXT: Final = "/v1/volume-key/next"
# POST {"epoch": N}; mutual TLS + session. The appliance's keyslot now opens with epoch N
# only: the platform makes the pending share current and destroys the one before it (or the
# legacy passphrase) with the same proof as deactivation. Repeating it is a no-op (200).
PATH_VOLUME_KEY_COMMIT: Final = "/v1/volume-key/commit"
PATH_CONFIG: Final = "/v1/config"  # GET; mutual TLS
PATH_SEAL_KEY: Final = "/v1/appliance/seal-key"  # POST {hybrid_public}; mutual TLS
PATH_NEXT_JOB: Final = "/v1/jobs/next"  # GET ?wait=SECONDS; mutual TLS
PATH_JOB_PREFIX: Final = "/v1/jobs/"
RESULT_SUFFIX: Final = "/result"  # POST /v1/jobs/{id}/result; mutual TLS
PROGRESS_SUFFIX: Final = "/progress"  # POST /v1/jobs/{id}/progress; mutual TLS
# POST; mutual TLS. Opens this boot's session: {"boot_counter": N, "keystore": "tpm"|"file"}
# -> {"session": TOKEN}. Every endpoint that hands out keys or jobs, takes results or
# heartbeats then needs HEADER_SESSION with the token of the appliance's *latest* session
# (clone detection).
PATH_SESSION: Final = "/v1/session"
# POST; mutual TLS + session. {"csr": PEM} -> {"certificate": PEM}: a new client certificate
# for a new key (keystore migration); the calling certificate is revoked in the same step.
PATH_CERTIFICATE: Final = "/v1/appliance/certificate"
# POST; mutual TLS + session. The heartbeat document (HB_*) -> {"heartbeat_interval": S}.
PATH_HEARTBEAT: Final = "/v1/heartbeat"
# POST; mutual TLS, no session. {} -> {"nonce": B64}: a fresh nonce for this appliance's next
# PATH_SESSION (single use, NONCE_TTL seconds). TPM evidence must be signed over it.
PATH_SESSION_NONCE: Final = "/v1/session/nonce"
# TPM enrollment (docs/platform.md "Attestation"); mutual TLS, no session; once per appliance.
# POST {ek_certificate, ak_public, kek_public, counter_public, pcrs, counter_base}
#   -> {credential_blob, encrypted_secret}: MakeCredential(EK, secret, name(AK))
PATH_ATTEST_ENROLL: Final = "/v1/attestation/enroll"
# POST {certify: EVIDENCE, quote: EVIDENCE + pcr_values} -> {"attestation": "attested"}
# Both signed by the AK over attestation_binding(secret, TLS key, sealing keys).
PATH_ATTEST_ACTIVATE: Final = "/v1/attestation/activate"
# Boot reports (docs/platform.md "Boot reports"); anonymous: an appliance whose TPM refused
# to unseal (PCR mismatch) has no client key. POST {} -> {"nonce": B64}: a stateless nonce
# (BOOT_NONCE_TTL seconds). POST {appliance, nonce, quote: EVIDENCE + pcr_values}
#   -> {"verdict": VERDICT_PCR_MISMATCH}: the AK's quote over that nonce, checked against the
# baseline and recorded like a session's mismatch. Never unlocks or returns anything else.
PATH_BOOT_NONCE: Final = "/v1/attestation/boot-nonce"
PATH_BOOT_REPORT: Final = "/v1/attestation/boot-report"


SESSION_ID_LEN: Final = 16  # hex digits of session_id()


def session_id(token: str) -> str:
    """A session's public name (heartbeats, operator views): not usable as the token.

    A truncated hash under its own label, so it is unrelated to the hash the platform keeps
    to recognise tokens, and knowing it does not let anyone present the session.
    """
    digest = hashlib.sha256(b"scanner-session-id\x00" + token.encode("utf-8", "replace"))
    return digest.hexdigest()[:SESSION_ID_LEN]


def attested_pcrs(bound: tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """The PCRs a quote covers: DEFAULT_ATTESTED_PCRS and those the keystore is bound to."""
    return tuple(sorted(set(bound) | set(DEFAULT_ATTESTED_PCRS)))


def attestation_binding(secret: bytes, tls_public_der: bytes, x25519_public: bytes, hybrid_public: bytes) -> bytes:
    """The qualifying data of the enrollment's Certify and quote (SHA-256, 32 bytes).

    Binds the platform's credential secret (only the TPM holding the EK could recover it,
    and only for the AK it names) to the appliance's TLS public key (SubjectPublicKeyInfo
    DER of its client certificate) and its sealing public keys (raw X25519; the hybrid key
    or empty): the AK vouches that these keys belong with the certified TPM-sealed KEK.
    """
    digest = hashlib.sha256(b"scanner-attestation-binding/v1\x00")
    for part in (secret, tls_public_der, x25519_public, hybrid_public):
        digest.update(len(part).to_bytes(4, "big"))
        digest.update(part)
    return digest.digest()


def result_path(job_id: str) -> str:
    """Path of the result upload endpoint for *job_id*."""
    return f"{PATH_JOB_PREFIX}{job_id}{RESULT_SUFFIX}"


def progress_path(job_id: str) -> str:
    """Path of the progress report endpoint for *job_id*."""
    return f"{PATH_JOB_PREFIX}{job_id}{PROGRESS_SUFFIX}"


# --- headers ----------------------------------------------------------------------------
# Result upload: lowercase hex SHA-256 of the whole body, sent by the appliance.
HEADER_CONTENT_SHA256: Final = "x-content-sha256"
# Session token of this boot (from PATH_SESSION).
HEADER_SESSION: Final = "x-scanner-session"

# --- JSON field names -------------------------------------------------------------------
F_TIME: Final = "time"  # float, UTC epoch seconds
F_CODE: Final = "code"  # activation code (string)
F_CSR: Final = "csr"  # PEM PKCS#10 certificate signing request (string)
F_X25519_PUBLIC: Final = "x25519_public"  # base64 of the raw 32-byte X25519 public key
F_HYBRID_PUBLIC: Final = "hybrid_public"  # base64 of the 1216-byte ML-KEM-768+X25519 key
F_APPLIANCE: Final = "appliance"  # appliance name (string)
F_CERTIFICATE: Final = "certificate"  # PEM client certificate (string)
F_CA: Final = "ca"  # PEM CA certificate (string)
F_SYSLOG: Final = "syslog"  # object or null
F_HOST: Final = "host"
F_PORT: Final = "port"
F_SEALED: Final = "sealed"  # base64 of a protocol.sealing blob
F_JOB: Final = "job"  # job object
F_ID: Final = "id"  # job id (string of decimal digits)
F_TARGETS: Final = "targets"  # list of strings: IPs, CIDRs or hostnames
F_PORTS: Final = "ports"  # port spec string, e.g. "22,80,8000-8100"
F_ENGINE: Final = "engine"  # "builtin" or "nmap"
F_CREDENTIAL: Final = "credential"  # {"name": str, "sealed": base64} or null
F_NAME: Final = "name"
F_LEASE_EXPIRES: Final = "lease_expires"  # float, UTC epoch seconds
F_ATTEMPT: Final = "attempt"  # int, 1 for the first hand-out of a job
F_SHA256: Final = "sha256"  # lowercase hex
F_TEXT: Final = "text"  # progress text
F_REASON: Final = "reason"
F_BOOT_COUNTER: Final = "boot_counter"  # int >= 1, monotonic per appliance (TPM NV counter)
F_KEYSTORE: Final = "keystore"  # "tpm" or "file": where the appliance keeps its keys
F_SESSION: Final = "session"  # opaque session token (string)
F_ERROR: Final = "error"
F_INCIDENT: Final = "incident"  # 500 only: id of the server's log entry (hex string)
F_HEARTBEAT_INTERVAL: Final = "heartbeat_interval"  # float seconds (config, heartbeat answer)
# Attestation (all TPM structures base64 of their TPM marshalling).
F_NONCE: Final = "nonce"  # base64 of NONCE_BYTES from PATH_SESSION_NONCE
F_EK_CERTIFICATE: Final = "ek_certificate"  # base64 DER of the TPM's EK certificate
F_AK_PUBLIC: Final = "ak_public"  # TPM2B_PUBLIC of the attestation key
F_KEK_PUBLIC: Final = "kek_public"  # TPM2B_PUBLIC of the sealed wrapping-key object
F_COUNTER_PUBLIC: Final = "counter_public"  # TPM2B_NV_PUBLIC of the boot counter index
F_PCRS: Final = "pcrs"  # list of PCR indices (SHA-256 bank) the keystore is bound to
F_COUNTER_BASE: Final = "counter_base"  # int >= 0 added to the NV counter (file-keystore past)
F_CREDENTIAL_BLOB: Final = "credential_blob"  # TPM2B_ID_OBJECT
F_ENCRYPTED_SECRET: Final = "encrypted_secret"  # noqa: S105 - a field name: TPM2B_ENCRYPTED_SECRET
F_CERTIFY: Final = "certify"  # evidence: TPM2_Certify of the KEK object by the AK
F_QUOTE: Final = "quote"  # evidence: TPM2_Quote over attested_pcrs(pcrs) + F_PCR_VALUES
F_COUNTER: Final = "counter"  # evidence: TPM2_NV_Certify of the boot counter (8 bytes)
F_ATTEST: Final = "attest"  # in evidence: TPM2B_ATTEST
F_SIGNATURE: Final = "signature"  # in evidence: TPMT_SIGNATURE
F_PCR_VALUES: Final = "pcr_values"  # in a quote: list of lowercase hex SHA-256 PCR values
F_ATTESTATION: Final = "attestation"  # "attested"
F_VERDICT: Final = "verdict"  # a boot report's outcome: VERDICT_PCR_MISMATCH
VERDICT_PCR_MISMATCH: Final = "pcr_mismatch_recorded"
# GET /v1/volume-key: "passphrase" (F_SEALED is the keyslot passphrase itself: appliances
# activated before split keys, until they migrate) or "split" (F_SEALED is the platform's
# share of key epoch F_EPOCH); F_NEXT is a pending share {"epoch", "sealed"} or null.
F_KEY_SCHEME: Final = "key_scheme"
F_EPOCH: Final = "epoch"  # int >= 1: the key epoch of a platform share
F_NEXT: Final = "next"
F_SHRED_PROVEN: Final = "shred_proven"  # commit answer: the old share is proven gone
KEY_SCHEME_PASSPHRASE: Final = "passphrase"  # noqa: S105 - a scheme name, not a secret
KEY_SCHEME_SPLIT: Final = "split"

# Heartbeat document (POST PATH_HEARTBEAT). Health only: never scan data, targets, banners,
# credentials or keys. The platform stores these fields and nothing else.
HB_AGENT_VERSION: Final = "agent_version"  # str
# The session the beat was sent in, as session_id(token) (never the token), and its boot
# counter; null only before a session is open. The platform records the values of the
# session that authenticated the request.
HB_BOOT_SESSION: Final = "boot_session"  # str (SESSION_ID_LEN hex digits) or null
HB_BOOT_COUNTER: Final = "boot_counter"  # int or null
HB_UPTIME: Final = "uptime"  # float seconds since the agent started
HB_TIME_OFFSET: Final = "time_offset"  # float seconds, platform minus appliance clock
HB_SCRATCH: Final = "scratch"  # {"used": int, "total": int} bytes, or null (not mounted)
HB_VOLUME: Final = "volume"  # {"used": int, "total": int} bytes, or null (not open)
HB_JOBS_DONE: Final = "jobs_done"  # int, since boot
HB_JOBS_FAILED: Final = "jobs_failed"  # int, since boot
HB_LAST_ERROR: Final = "last_error"  # str (event and reason, <= MAX_LAST_ERROR) or null
HB_USED: Final = "used"
HB_TOTAL: Final = "total"
HEARTBEAT_FIELDS: Final = (
    HB_AGENT_VERSION, HB_BOOT_SESSION, HB_BOOT_COUNTER, HB_UPTIME, HB_TIME_OFFSET,
    HB_SCRATCH, HB_VOLUME, HB_JOBS_DONE, HB_JOBS_FAILED, HB_LAST_ERROR,
)  # fmt: skip
MAX_LAST_ERROR: Final = 200  # characters
MAX_AGENT_VERSION: Final = 64  # characters
MIN_HEARTBEAT_INTERVAL: Final = 0.1  # seconds; tests use sub-second beats
MAX_HEARTBEAT_INTERVAL: Final = 86400.0
DEFAULT_HEARTBEAT_INTERVAL: Final = 60.0

QUERY_WAIT: Final = "wait"  # long-poll seconds for PATH_NEXT_JOB

ENGINE_BUILTIN: Final = "builtin"
ENGINE_NMAP: Final = "nmap"
ENGINES: Final = (ENGINE_BUILTIN, ENGINE_NMAP)

# Labels bound into protocol.sealing blobs; a blob sealed for one purpose never opens for another.
SEAL_CONTEXT_CREDENTIAL: Final = b"credential"
SEAL_CONTEXT_VOLUME_KEY: Final = b"volume-key"
SEAL_CONTEXT_VOLUME_SHARE: Final = b"volume-share"  # a platform share, never a passphrase

# --- reasons (the machine-readable part of every error) ---------------------------------
REASON_BAD_REQUEST: Final = "bad_request"  # 400: malformed JSON, missing/invalid fields
REASON_CLIENT_CERT_REQUIRED: Final = "client_certificate_required"  # 401: no client cert
REASON_UNKNOWN_CERTIFICATE: Final = "unknown_certificate"  # 403: valid CA, not on record
REASON_DEACTIVATED: Final = "deactivated"  # 403: appliance deactivated / cert revoked
REASON_INVALID_CODE: Final = "invalid_code"  # 403: unknown or already used activation code
REASON_CODE_EXPIRED: Final = "code_expired"  # 403: activation code past its expiry
REASON_NOT_FOUND: Final = "not_found"  # 404: no such endpoint, or no such job for caller
REASON_METHOD_NOT_ALLOWED: Final = "method_not_allowed"  # 405
REASON_ALREADY_COMPLETED: Final = "already_completed"  # 409: job has a different result
REASON_LENGTH_REQUIRED: Final = "length_required"  # 411
REASON_TOO_LARGE: Final = "too_large"  # 413: body over the configured limit
REASON_DIGEST_MISMATCH: Final = "digest_mismatch"  # 400: body does not match its SHA-256
REASON_TIMEOUT: Final = "timeout"  # 408: request not received in time
REASON_UNAVAILABLE: Final = "unavailable"  # 503: no keyslot passphrase (never activated)
REASON_BUSY: Final = "busy"  # 503 + Retry-After: the unauthenticated budget is in use; retry
REASON_INTERNAL: Final = "internal"  # 500: generic; F_INCIDENT names the server log line
REASON_SESSION_REQUIRED: Final = "session_required"  # 428: no or unknown session token
REASON_QUARANTINED: Final = "quarantined"  # 403: suspected clone; operator must clear it
REASON_KEY_CONFLICT: Final = "key_conflict"  # 409: a different hybrid key is on record
# Attestation (403 unless noted); docs/platform.md lists what each one means.
REASON_ATTESTATION_REQUIRED: Final = "attestation_required"  # enrolled: a session needs TPM evidence
REASON_ATTESTATION_UNAVAILABLE: Final = "attestation_unavailable"  # 409: platform trusts no EK CA
REASON_ATTESTATION_INVALID: Final = "attestation_invalid"  # bad signature/structure/EK/AK/counter name
REASON_NONCE_INVALID: Final = "nonce_invalid"  # unknown, used or expired nonce (replayed evidence)
REASON_PCR_MISMATCH: Final = "pcr_mismatch"  # the quote's PCRs differ from the recorded baseline
REASON_NOT_TPM_RESIDENT: Final = "not_tpm_resident"  # certified key is not FIXEDTPM|FIXEDPARENT
REASON_ALREADY_ENROLLED: Final = "already_enrolled"  # 409: this appliance's TPM is enrolled already
REASON_PCR_MATCH: Final = "pcr_match"  # 409: a boot report whose quote matches the baseline
REASON_EPOCH_MISMATCH: Final = "epoch_mismatch"  # 409: commit of an epoch that is not pending

# --- limits -----------------------------------------------------------------------------
MAX_JSON_BODY: Final = 64 * 1024  # bytes, for every JSON request body
MAX_JSON_DEPTH: Final = 32  # nesting of arrays/objects in a JSON request body
MAX_JOB_ID: Final = 2**63 - 1  # job ids are signed 64-bit database keys
MAX_RESULT_BODY_DEFAULT: Final = 16 * 1024 * 1024  # bytes; server-configurable
MAX_WAIT_SECONDS: Final = 60.0  # long-poll wait: 0 <= wait <= this, else 400
MAX_PROGRESS_TEXT: Final = 1000  # characters
MAX_RESPONSE_BODY: Final = 4 * 1024 * 1024  # what the client accepts from the platform
MAX_HEADER_BYTES: Final = 16 * 1024
MAX_BOOT_COUNTER: Final = 2**63 - 1  # fits SQLite's INTEGER
KEYSTORES: Final = ("tpm", "file")
NONCE_BYTES: Final = 32
NONCE_TTL: Final = 120.0  # seconds a session nonce stays usable
BOOT_NONCE_TTL: Final = 60.0  # seconds a boot-report nonce stays usable
MAX_EVIDENCE: Final = 2048  # bytes of one marshalled TPM structure (attest, signature, public)
MAX_EK_CERTIFICATE: Final = 4096  # bytes (DER)
MAX_PCR_INDEX: Final = 23
# Every quote covers the boot chain's PCRs (firmware 0-7; GRUB's commands and kernel command
# line 8, the files it loaded 9) besides those the keystore is bound to, so that the platform
# sees what booted even where the keys do not depend on it.
DEFAULT_ATTESTED_PCRS: Final = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)
# A boot counter that advances by more than this in one step is clone evidence like one that
# goes back (an agent advances it once per boot attempt; a forged one jumps).
MAX_BOOT_COUNTER_STEP: Final = 1000
NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
JOB_ID_RE: Final = re.compile(r"^[1-9][0-9]{0,18}$")
SHA256_HEX_RE: Final = re.compile(r"^[0-9a-f]{64}$")

# --- result document --------------------------------------------------------------------
# The platform stores the uploaded body as opaque bytes. `scanner-platform results show`
# renders it as a table when it is JSON of this shape (recommended for appliances):
#   {"job": "7", "engine": "builtin", "started": 1764000000.0, "finished": 1764000001.5,
#    "hosts": [{"target": "127.0.0.1", "address": "127.0.0.1",
#               "ports": [{"port": 22, "state": "open", "service": "ssh",
#                          "banner": "SSH-2.0-OpenSSH_9.2"}]}]}
R_HOSTS: Final = "hosts"
R_TARGET: Final = "target"
R_ADDRESS: Final = "address"
R_PORTS: Final = "ports"
R_PORT: Final = "port"
R_STATE: Final = "state"
R_SERVICE: Final = "service"
R_BANNER: Final = "banner"


def parse_job_id(value: str) -> int | None:
    """*value* as a job id (decimal, 1..MAX_JOB_ID), or None when it is not one."""
    if not JOB_ID_RE.match(value):
        return None
    job_id = int(value)
    return job_id if job_id <= MAX_JOB_ID else None


class SpecError(ValueError):
    """A target or port spec is malformed (the message names the bad part)."""


def parse_port_spec(spec: str) -> list[tuple[int, int]]:
    """Parse "22,80,8000-8100" into sorted, merged inclusive ranges; raise SpecError."""
    ranges: list[tuple[int, int]] = []
    for raw in spec.split(","):
        part = raw.strip()
        if not part:
            raise SpecError(f"empty element in port spec {spec!r}")
        lo_s, sep, hi_s = part.partition("-")
        try:
            lo = int(lo_s)
            hi = int(hi_s) if sep else lo
        except ValueError:
            raise SpecError(f"port spec element {part!r} is not a number or range") from None
        if not (1 <= lo <= 65535 and 1 <= hi <= 65535) or lo > hi:
            raise SpecError(f"port spec element {part!r} is outside 1-65535 or reversed")
        ranges.append((lo, hi))
    ranges.sort()
    merged: list[tuple[int, int]] = []
    for lo, hi in ranges:
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


def format_port_spec(ranges: list[tuple[int, int]]) -> str:
    """Inverse of parse_port_spec: [(22, 22), (80, 90)] -> "22,80-90"."""
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ranges)


def expand_ports(spec: str) -> list[int]:
    """Every port of a spec, ascending (at most 65535 entries)."""
    return [p for lo, hi in parse_port_spec(spec) for p in range(lo, hi + 1)]


_TARGET_RE = re.compile(r"^[A-Za-z0-9:._/-]{1,253}$")


def parse_targets(spec: str) -> list[str]:
    """Split "10.0.0.1,10.0.1.0/24,host.example" into targets; raise SpecError.

    Only the character set is checked here (IPs, CIDRs, hostnames, IPv6); the appliance
    resolves and validates each target when it scans.
    """
    targets: list[str] = []
    for raw in spec.split(","):
        t = raw.strip()
        if not t:
            raise SpecError(f"empty element in target spec {spec!r}")
        if not _TARGET_RE.match(t):
            raise SpecError(f"target {t!r} has characters outside A-Z a-z 0-9 : . _ / -")
        targets.append(t)
    return targets
