"""Appliance-side HTTPS client for the platform API (trio + SSLStream + h11).

HTTP/1.1 keep-alive: a mutually authenticated connection stays open after a request and
carries the next one (poll, progress, upload), so a boot session pays for one TLS handshake,
not one per request. A kept-alive connection that the platform closed meanwhile is noticed
on the next request (no byte of the answer arrives) and that request is sent once more on a
fresh connection: every endpoint is safe to repeat (a result upload is stored once and
acknowledged again by digest). Any other failure closes the connection, so a broken
connection never poisons a later request. `aclose()` closes the idle connections. The
caller brings the TLS context: the agent's ``agent.tls.client_context``, the one TLS client
policy (the platform CA given at activation as the only anchor, hostnames checked, TLS 1.2
minimum, certificate times checked against the platform-synced clock).

Typical use by the agent::

    ctx = agent.tls.client_context(ca_pem, clock, cert_path, key_path)  # the one TLS client policy
    client = PlatformClient("https://platform.example:8443", ctx)
    now = await client.time()
    offer = await client.volume_key()   # open each part with sealing.open_sealed (api.SEAL_CONTEXT_*)
    job = await client.next_job(wait=30)         # None when no job arrived within `wait`
    digest = await client.upload_result(job.id, body)

Errors: every failure raises a subclass of `PlatformError` (``status`` is the HTTP status or
None, ``reason`` the machine-readable reason from `protocol.api`). Catch `DeactivatedError`
BEFORE `PlatformError`. `PlatformTLSError` means the TLS handshake or certificate checks
failed (wrong CA, wrong hostname, refused client certificate, protocol version);
`PlatformUnavailableError` means the platform could not be reached or the connection broke
(retry with backoff). Messages never contain keys, codes, credentials or bodies.

The errors and data types the methods return, and the checks that parse response bodies
into them, are `protocol.replies` (re-exported here); the HTTP/1.1 and TLS plumbing below
the connections is `protocol.http1`, shared with the platform server.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote, urlsplit

import h11
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from protocol import api, http1
from protocol.proxy import ProxyConfig, ProxyError, open_stream
from protocol.replies import (
    ActivationResult,
    DeactivatedError,
    DigestMismatchError,
    Job,
    PlatformConfig,
    PlatformError,
    PlatformTLSError,
    PlatformUnavailableError,
    QuarantinedError,
    SealedShare,
    SyslogTarget,
    VolumeKeyOffer,
    b64decode,
    broken,
    epoch_from,
    error_for,
    interval_from,
    is_busy,
    job_from,
    json_object,
    retry_after,
    share_from,
    syslog_from,
)

# The public names of `protocol.replies` stay importable from here, where callers always found them.
__all__ = [
    "DEFAULT_TIMEOUT",
    "REASON_PROXY",
    "ActivationResult",
    "DeactivatedError",
    "DigestMismatchError",
    "Job",
    "PlatformClient",
    "PlatformConfig",
    "PlatformError",
    "PlatformTLSError",
    "PlatformUnavailableError",
    "QuarantinedError",
    "SealedShare",
    "SyslogTarget",
    "VolumeKeyOffer",
    "new_client_key_and_csr",
]

DEFAULT_TIMEOUT: Final = 30.0
# How long to wait for "100 Continue" before sending a body anyway (RFC 9110 §10.1.1).
_EXPECT_CONTINUE_WAIT: Final = 2.0
_USER_AGENT: Final = "scratchfs-agent/1"
# Reason of a PlatformUnavailableError raised because the CONNECT proxy failed (not the platform).
REASON_PROXY: Final = "proxy"


# --- TLS key helpers -----------------------------------------------------------


def new_client_key_and_csr(common_name: str) -> tuple[bytes, bytes]:
    """A fresh P-256 TLS key (PKCS#8 PEM, unencrypted) and a CSR (PEM) for activation.

    The platform ignores the CSR's subject (it names the certificate after the appliance);
    the CSR proves possession of the key.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    pem, pkcs8 = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    return key.private_bytes(pem, pkcs8, serialization.NoEncryption()), csr.public_bytes(pem)


# --- the client -------------------------------------------------------------------------


@dataclass
class _Response:
    status: int
    headers: dict[str, str]
    body: bytes


# Idle kept-alive connections held per client: one for the job loop, one for a concurrent
# progress report; more would only hold server slots.
_MAX_IDLE: Final = 2


@dataclass
class _Live:
    """One open connection (`protocol.http1`); ``reused`` once it carried an exchange."""

    http: http1.Http1Stream
    reused: bool = False


# 503 busy: how many times a request is sent again, after Retry-After (clamped to 1-5 s).
_BUSY_RETRIES: Final = 5


class PlatformClient:
    """Async client for one platform. Safe to use from several trio tasks at once."""

    def __init__(
        self,
        base_url: str,
        ssl_context: ssl.SSLContext,
        timeout: float = DEFAULT_TIMEOUT,
        proxy: ProxyConfig | None = None,
        *,
        local_address: str | None = None,
    ) -> None:
        """*base_url* like "https://platform.example:8443" (https only, optional path prefix).

        With *proxy*, every connection is an HTTP CONNECT tunnel through it (TLS inside the
        tunnel, same context); no direct connection is ever attempted. *local_address*
        binds the client's side of direct connections (the load generator gives each
        simulated appliance its own loopback address, as a fleet has).
        """
        parts = urlsplit(base_url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError("platform URL must look like https://HOST[:PORT]")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError("platform URL must not carry a query, fragment or user info")
        self._host = parts.hostname
        self._port = parts.port or 443
        self._prefix = parts.path.rstrip("/")
        host_header = f"[{self._host}]" if ":" in self._host else self._host
        self._host_header = host_header if self._port == 443 else f"{host_header}:{self._port}"
        self._ctx = ssl_context
        self._timeout = timeout
        self._idle: list[_Live] = []
        self._local_address = local_address
        self._proxy = proxy
        self.base_url = base_url
        # This boot's session token (open_session); sent with every request once set.
        self.session: str | None = None

    def __repr__(self) -> str:
        return f"PlatformClient({self.base_url!r})"

    # -- public API --

    async def time(self) -> float:
        """The platform's current UTC time in epoch seconds (client certificate optional)."""
        data = await self._json("GET", api.PATH_TIME)
        value = data.get(api.F_TIME)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise PlatformError(None, "protocol", "platform response: time is not a number")
        return float(value)

    async def activate(
        self, code: str, csr_pem: bytes, x25519_public: bytes, hybrid_public: bytes | None = None
    ) -> ActivationResult:
        """Exchange a one-time activation code and a CSR for this appliance's certificate."""
        payload = {
            api.F_CODE: code,
            api.F_CSR: csr_pem.decode("ascii"),
            api.F_X25519_PUBLIC: base64.b64encode(x25519_public).decode("ascii"),
        }
        if hybrid_public is not None:
            payload[api.F_HYBRID_PUBLIC] = base64.b64encode(hybrid_public).decode("ascii")
        data = await self._json("POST", api.PATH_ACTIVATE, payload)
        name, cert, ca = data.get(api.F_APPLIANCE), data.get(api.F_CERTIFICATE), data.get(api.F_CA)
        if not isinstance(name, str) or not isinstance(cert, str) or not isinstance(ca, str):
            raise PlatformError(None, "protocol", "platform response: activation is malformed")
        return ActivationResult(
            appliance=name,
            certificate_pem=cert.encode(),
            ca_pem=ca.encode(),
            syslog=syslog_from(data.get(api.F_SYSLOG)),
        )

    async def open_session(
        self, boot_counter: int, keystore: str, evidence: Mapping[str, Any] | None = None
    ) -> str:
        """Register this boot with the platform; later requests carry the returned token.

        *boot_counter* must grow with every boot (the TPM's NV counter where there is one):
        a counter that goes back, or requests with an older session after a newer one
        opened, look like a cloned appliance, and the platform quarantines it. *evidence*
        (F_NONCE, F_QUOTE, F_COUNTER; agent.attest_platform) is the TPM's proof of this
        boot; an enrolled appliance's platform takes the counter from it, not from the body.
        """
        payload: dict[str, Any] = {api.F_BOOT_COUNTER: boot_counter, api.F_KEYSTORE: keystore}
        if evidence is not None:
            payload.update(evidence)
        data = await self._json("POST", api.PATH_SESSION, payload)
        token = data.get(api.F_SESSION)
        if not isinstance(token, str) or not token or len(token) > 128:
            raise PlatformError(None, "protocol", "platform response: session is malformed")
        self.session = token
        return token

    async def session_nonce(self, path: str = api.PATH_SESSION_NONCE) -> bytes:
        """A fresh, single-use nonce for this appliance's next session's TPM evidence (or, with
        *path* PATH_BOOT_NONCE and no client certificate needed, for a boot report)."""
        data = await self._json("POST", path, {})
        nonce = b64decode(data.get(api.F_NONCE), "nonce")
        if len(nonce) != api.NONCE_BYTES:
            raise PlatformError(None, "protocol", "platform response: nonce is malformed")
        return nonce

    async def boot_report(self, report: Mapping[str, Any]) -> str:
        """Report a boot whose TPM refused to unseal (agent.boot_report); -> the verdict."""
        verdict = (await self._json("POST", api.PATH_BOOT_REPORT, report)).get(api.F_VERDICT)
        if not isinstance(verdict, str) or not verdict.isidentifier():
            raise PlatformError(None, "protocol", "platform response: verdict is malformed")
        return verdict

    async def attestation_enroll(self, enrollment: Mapping[str, Any]) -> tuple[bytes, bytes]:
        """Enroll this appliance's TPM: -> (credential blob, encrypted secret) of MakeCredential."""
        data = await self._json("POST", api.PATH_ATTEST_ENROLL, enrollment)
        blob = b64decode(data.get(api.F_CREDENTIAL_BLOB), "credential blob")
        secret = b64decode(data.get(api.F_ENCRYPTED_SECRET), "encrypted secret")
        return blob, secret

    async def attestation_activate(self, proof: Mapping[str, Any]) -> str:
        """Send the Certify and baseline quote; -> the platform's verdict (``attested``)."""
        data = await self._json("POST", api.PATH_ATTEST_ACTIVATE, proof)
        verdict = data.get(api.F_ATTESTATION)
        if not isinstance(verdict, str):
            raise PlatformError(None, "protocol", "platform response: attestation is malformed")
        return verdict

    async def renew_certificate(self, csr_pem: bytes) -> bytes:
        """A new client certificate for the key in *csr_pem*; the current one is revoked."""
        data = await self._json("POST", api.PATH_CERTIFICATE, {api.F_CSR: csr_pem.decode("ascii")})
        cert = data.get(api.F_CERTIFICATE)
        if not isinstance(cert, str) or "BEGIN CERTIFICATE" not in cert:
            raise PlatformError(None, "protocol", "platform response: certificate is malformed")
        return cert.encode()

    async def volume_key(self) -> VolumeKeyOffer:
        """What unlocks this appliance's volume: the keyslot passphrase itself (appliances not
        yet migrated) or the platform's share of the current key epoch, plus any pending
        share (migration or rotation); each sealed to the appliance's hybrid (v2) or X25519
        (v1) key."""
        data = await self._json("GET", api.PATH_VOLUME_KEY)
        scheme = data.get(api.F_KEY_SCHEME, api.KEY_SCHEME_PASSPHRASE)  # older platforms: passphrase
        sealed = b64decode(data.get(api.F_SEALED), "sealed volume key")
        if scheme == api.KEY_SCHEME_PASSPHRASE:
            current = SealedShare(0, sealed)
        elif scheme == api.KEY_SCHEME_SPLIT:
            current = SealedShare(epoch_from(data.get(api.F_EPOCH)), sealed)
        else:
            raise PlatformError(200, "protocol", "platform named an unknown key scheme")
        nxt = data.get(api.F_NEXT)
        return VolumeKeyOffer(scheme, current, None if nxt is None else share_from(nxt))

    async def keyslot_passphrase(self) -> bytes:
        """The sealed keyslot passphrase of an appliance that has not moved to split keys.

        Raises PlatformError("protocol") once it has: what the platform then holds is only a
        share, and `volume_key` is the call that says so."""
        offer = await self.volume_key()
        if offer.scheme != api.KEY_SCHEME_PASSPHRASE:
            raise PlatformError(200, "protocol", "this appliance uses split volume keys; use volume_key()")
        return offer.current.sealed

    async def volume_key_next(self) -> SealedShare:
        """Ask for the pending platform share (created on the first call: migration)."""
        return share_from(await self._json("POST", api.PATH_VOLUME_KEY_NEXT, {}))

    async def volume_key_commit(self, epoch: int) -> bool:
        """Tell the platform the keyslot now opens with *epoch* only; True once the platform
        proved the previous share (or passphrase) destroyed."""
        data = await self._json("POST", api.PATH_VOLUME_KEY_COMMIT, {api.F_EPOCH: epoch})
        return data.get(api.F_SHRED_PROVEN) is True

    async def upload_seal_key(self, hybrid_public: bytes) -> None:
        """Tell the platform this appliance's hybrid sealing key (mutual TLS; idempotent)."""
        await self._json(
            "POST",
            api.PATH_SEAL_KEY,
            {api.F_HYBRID_PUBLIC: base64.b64encode(hybrid_public).decode("ascii")},
        )

    async def config(self) -> PlatformConfig:
        """The account's configuration (remote syslog target or None, heartbeat interval)."""
        data = await self._json("GET", api.PATH_CONFIG)
        return PlatformConfig(
            syslog=syslog_from(data.get(api.F_SYSLOG)),
            heartbeat_interval=interval_from(data.get(api.F_HEARTBEAT_INTERVAL)),
        )

    async def heartbeat(self, status: Mapping[str, Any]) -> float | None:
        """Report health (the api.HB_* fields); return the interval the platform wants now."""
        data = await self._json("POST", api.PATH_HEARTBEAT, status)
        return interval_from(data.get(api.F_HEARTBEAT_INTERVAL))

    async def next_job(self, wait: float) -> Job | None:
        """Long-poll up to *wait* seconds (clamped to api.MAX_WAIT_SECONDS) for a job.

        Returns None if none arrived in time. The returned job is leased to this appliance
        until ``lease_expires``; after that the platform offers it again.
        """
        wait = max(0.0, min(float(wait), api.MAX_WAIT_SECONDS))
        resp = await self._request(
            "GET",
            f"{api.PATH_NEXT_JOB}?{api.QUERY_WAIT}={wait:g}",
            timeout=self._timeout + wait,
        )
        if resp.status == 204:
            return None
        data = json_object(resp.status, resp.body)
        job = data.get(api.F_JOB)
        if not isinstance(job, dict):
            raise PlatformError(None, "protocol", "platform response: job is not an object")
        return job_from(job)

    async def upload_result(self, job_id: str, body: bytes) -> str:
        """Upload the job's result document with its SHA-256; return the acknowledged digest.

        Raises DigestMismatchError if the platform reports a mismatch or acknowledges a
        different digest. Re-uploading the same body for a completed job is acknowledged
        again (idempotent); a different body gets PlatformError reason "already_completed".
        """
        digest = hashlib.sha256(body).hexdigest()
        resp = await self._request(
            "POST",
            api.result_path(quote(job_id, safe="")),
            body=body,
            headers={
                "content-type": "application/octet-stream",
                api.HEADER_CONTENT_SHA256: digest,
            },
            timeout=self._timeout + len(body) / 1_000_000,
        )
        data = json_object(resp.status, resp.body)
        acked = data.get(api.F_SHA256)
        if not isinstance(acked, str) or not hmac.compare_digest(acked, digest):
            raise DigestMismatchError(
                resp.status, api.REASON_DIGEST_MISMATCH, "platform acknowledged a different digest"
            )
        return acked

    async def progress(self, job_id: str, text: str) -> None:
        """Report a short progress line (at most api.MAX_PROGRESS_TEXT characters)."""
        await self._json(
            "POST",
            api.progress_path(quote(job_id, safe="")),
            {api.F_TEXT: text[: api.MAX_PROGRESS_TEXT]},
        )

    async def aclose(self) -> None:
        """Close the kept-alive connections (the client stays usable: it reconnects)."""
        idle, self._idle = self._idle, []
        for live in idle:
            await live.http.aclose_forcefully()

    # -- plumbing --

    async def _json(
        self, method: str, path: str, payload: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        body = None
        headers: dict[str, str] = {}
        if payload is not None:
            body = json.dumps(payload).encode()
            headers["content-type"] = "application/json"
        resp = await self._request(method, path, body=body, headers=headers)
        return json_object(resp.status, resp.body)

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> _Response:
        limit = self._timeout if timeout is None else timeout
        for attempt in range(_BUSY_RETRIES + 1):
            try:
                with trio.fail_after(limit):
                    resp = await self._exchange(method, self._prefix + path, body, headers or {})
            except trio.TooSlowError:
                raise PlatformUnavailableError(
                    None, "unavailable", f"platform did not answer within {limit:g} s"
                ) from None
            if resp.status == 503 and attempt < _BUSY_RETRIES and is_busy(resp.body):
                # The platform's unauthenticated budget was full (e.g. many activations at
                # once): it asked us to come back; spread the retries so we do not return
                # as one wave.
                await trio.sleep(retry_after(resp.headers) * (0.5 + secrets.randbelow(1000) / 1000))
                continue
            break
        if not 200 <= resp.status < 300:
            raise error_for(resp.status, resp.body)
        return resp

    async def _open_tcp(self) -> trio.SocketStream:
        """The one place that opens the TCP connection to the platform.

        Through the configured CONNECT proxy when there is one (never directly then),
        otherwise directly. TLS is layered on top by the caller either way.
        """
        try:
            if self._proxy is None and self._local_address is not None:
                return await trio.open_tcp_stream(self._host, self._port, local_address=self._local_address)
            return await open_stream(self._proxy, self._host, self._port)
        except ProxyError as e:
            raise PlatformUnavailableError(None, REASON_PROXY, str(e)) from None

    async def _connect(self) -> _Live:
        try:
            tcp = await self._open_tcp()
        except OSError as e:
            raise PlatformUnavailableError(
                None,
                "unavailable",
                f"cannot connect to platform {self._host}:{self._port}: "
                f"{e.strerror or type(e).__name__}",
            ) from None
        stream = trio.SSLStream(tcp, self._ctx, server_hostname=self._host, https_compatible=True)
        try:
            await http1.tls_handshake(stream)
        except http1.StreamBroken as e:
            await trio.aclose_forcefully(stream)
            raise broken(e, "connection closed during TLS handshake") from None
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return _Live(http1.Http1Stream(stream, h11.CLIENT))

    async def _exchange(
        self, method: str, target: str, body: bytes | None, extra: Mapping[str, str]
    ) -> _Response:
        while True:
            live = self._idle.pop() if self._idle else await self._connect()
            try:
                resp = await self._exchange_on(live.http, method, target, body, extra)
            except PlatformUnavailableError:
                await live.http.aclose_forcefully()
                if live.reused and live.http.received == 0:
                    continue  # the platform closed the idle connection: once more, fresh
                raise
            except BaseException:
                await live.http.aclose_forcefully()
                raise
            if live.http.reusable() and len(self._idle) < _MAX_IDLE:
                live.http.start_next_cycle()
                live.reused = True
                self._idle.append(live)
            else:
                await live.http.aclose_forcefully()
            return resp

    async def _exchange_on(
        self, http: http1.Http1Stream, method: str, target: str, body: bytes | None, extra: Mapping[str, str]
    ) -> _Response:
        hdrs = [
            ("host", self._host_header),
            ("user-agent", _USER_AGENT),
            ("accept", "application/json"),
        ]
        if self.session is not None:
            hdrs.append((api.HEADER_SESSION, self.session))
        hdrs += list(extra.items())
        if body is not None:
            hdrs.append(("content-length", str(len(body))))
            if len(body) > http1.RECEIVE_BYTES:
                # Let the platform refuse (size, auth, job) before we send megabytes.
                hdrs.append(("expect", "100-continue"))
        try:
            data = http.h11.send(h11.Request(method=method, target=target, headers=hdrs))
            if body is None:
                data += http.h11.send(h11.EndOfMessage())  # no bytes; lets h11 reuse the connection
            await http.send_raw(data)
        except http1.StreamBroken as e:
            raise broken(e, "connection broke") from None
        early: h11.Response | None = None
        if body is not None:
            if len(body) > http1.RECEIVE_BYTES:
                early = await self._await_continue(http)
            if early is None:
                try:
                    await http.send_body(body)
                except http1.StreamBroken as e:
                    raise broken(e, "connection broke while sending the request body") from None
        return await self._read_response(http, early)

    async def _receive(self, http: http1.Http1Stream) -> bytes:
        try:
            return await http.receive()
        except http1.StreamBroken as e:
            # With TLS 1.3 the server's verdict on our client certificate arrives as an
            # alert after our side of the handshake already finished.
            raise broken(e, "connection broke") from None

    async def _await_continue(self, http: http1.Http1Stream) -> h11.Response | None:
        with trio.move_on_after(_EXPECT_CONTINUE_WAIT):
            while True:
                event = self._next_event(http)
                if event is h11.NEED_DATA:
                    await self._receive(http)
                    continue
                if isinstance(event, h11.InformationalResponse):
                    if event.status_code == 100:
                        return None
                    continue
                if isinstance(event, h11.Response):
                    return event  # refused before the body: do not send it
                raise PlatformUnavailableError(None, "unavailable", "connection closed early")
        return None

    def _next_event(self, http: http1.Http1Stream) -> Any:
        try:
            return http.next_event()
        except http1.PeerProtocolError:
            raise PlatformError(None, "protocol", "platform sent malformed HTTP") from None

    async def _read_response(self, http: http1.Http1Stream, early: h11.Response | None) -> _Response:
        head = early
        chunks: list[bytes] = []
        size = 0
        while True:
            event = self._next_event(http)
            if event is h11.NEED_DATA:
                data = await self._receive(http)
                if not data and head is None:
                    # Closed before answering: a kept-alive connection the platform had
                    # closed, or a connection it refused (budget full). Not malformed HTTP.
                    raise PlatformUnavailableError(None, "unavailable", "platform closed the connection")
                continue
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                head = event
                continue
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > api.MAX_RESPONSE_BODY:
                    raise PlatformError(None, "protocol", "platform response body too large")
                chunks.append(bytes(event.data))
                continue
            if isinstance(event, h11.EndOfMessage) and head is not None:
                headers = {
                    k.decode("latin-1").lower(): v.decode("latin-1") for k, v in head.headers
                }
                return _Response(head.status_code, headers, b"".join(chunks))
            raise PlatformUnavailableError(
                None, "unavailable", "connection closed before the response was complete"
            )
