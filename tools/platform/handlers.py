"""The platform's endpoints: who is calling (from the verified client certificate) and what
each request does. Which handler serves a request, and who may call it, is the route table's
(`routes`); HTTP framing lives in `http`, TLS and sockets in `server`, SQL in `db`; the
attestation and volume-key work in `attest_endpoints` and `volume_key_endpoints`.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from protocol import api, sealing
from tools.platform import ca, db, health, keys, routes
from tools.platform.attest_endpoints import AttestationEndpoints
from tools.platform.boot_nonce import BootNonces
from tools.platform.http import Exchange, HttpError, Response, json_response
from tools.platform.volume_key_endpoints import VolumeKeyEndpoints

log = logging.getLogger("scanner-platform")
T = TypeVar("T")
# A bound endpoint method: (exchange, calling appliance or None, *path values) -> response.
# The appliance is never None on a route that needs a certificate: the dispatcher checked.
Handler = Callable[..., Awaitable[Response]]
_TABLE = routes.Table(routes.ROUTES)
_QUARANTINED_TEXT = (
    "this appliance is quarantined (suspected clone); an operator must run 'scanner-platform appliance clear'"
)


def _token_hash(token: str) -> bytes:
    # Only the hash is stored: a database reader cannot replay a live session token.
    return hashlib.sha256(b"scanner-session\x00" + token.encode("utf-8", "replace")).digest()


@dataclass(frozen=True)
class AppConfig:
    """Server behaviour knobs (CLI flags of `serve`)."""

    lease_seconds: float = 300.0
    max_result_bytes: int = api.MAX_RESULT_BODY_DEFAULT
    poll_interval: float = 0.5


class Database:
    """Runs blocking Storage calls in worker threads, as many at once as the backend allows
    (one for SQLite, which is serial anyway; the pool size for PostgreSQL)."""

    def __init__(self, storage: db.Storage) -> None:
        self.storage = storage
        self._limiter = trio.CapacityLimiter(storage.max_concurrency)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Call ``fn(*args)`` in the database thread."""
        return await trio.to_thread.run_sync(functools.partial(fn, *args), limiter=self._limiter)


class JobWaker:
    """Wakes long-polls when their appliance may have a job to lease.

    A long-poll registers an event and sleeps on it, holding neither a database thread nor a
    query loop. One task per node finds out which waiting appliances have work: on
    PostgreSQL it waits for NOTIFY (sent by every job insert, from any node or CLI); on
    SQLite it watches ``PRAGMA data_version``, which changes when another process commits.
    Leases that expire send no signal, so the same task also sweeps every
    ``sweep_interval`` seconds, one query per node, however many appliances wait.
    """

    def __init__(self, database: Database, poll_interval: float, sweep_interval: float = 1.0) -> None:
        self._db = database
        self._poll = poll_interval
        self._sweep = max(sweep_interval, poll_interval)
        self._waiters: dict[int, set[trio.Event]] = {}

    @contextmanager
    def listen(self, appliance_id: int) -> Iterator[trio.Event]:
        """An event set when *appliance_id* may have a job; register it BEFORE looking."""
        event = trio.Event()
        self._waiters.setdefault(appliance_id, set()).add(event)
        try:
            yield event
        finally:
            events = self._waiters.get(appliance_id)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._waiters[appliance_id]

    def waiting(self) -> int:
        """How many long-polls are waiting (for tests and diagnostics)."""
        return sum(len(v) for v in self._waiters.values())

    def _wake(self, appliance_ids: set[int]) -> None:
        for aid in appliance_ids:
            for event in self._waiters.get(aid, ()):
                event.set()

    async def run(self) -> None:
        """Forever: wait for a change signal or the sweep timer, then wake who has work."""
        storage = self._db.storage
        last_sweep = trio.current_time()
        token = await self._db.run(storage.change_token)
        while True:
            notified: set[int] | None
            if storage.has_notifications:
                # Blocks in its own connection and thread, not in the request pool.
                notified = await trio.to_thread.run_sync(storage.wait_job_notifications, self._poll)
            else:
                await trio.sleep(self._poll)
                new_token = await self._db.run(storage.change_token)
                notified = None if new_token != token else set()
                token = new_token
            now = trio.current_time()
            if not self._waiters:
                continue
            if notified:
                self._wake(notified & set(self._waiters))
            if notified is None or now - last_sweep >= self._sweep:
                last_sweep = now
                ready = await self._db.run(storage.leasable_appliances, time.time())
                self._wake(ready & set(self._waiters))


def _syslog_doc(value: Any) -> dict[str, Any] | None:
    if not isinstance(value, dict):
        return None
    return {api.F_HOST: value["host"], api.F_PORT: value["port"], api.F_CA: value["ca"]}


def _b64_field(doc: dict[str, Any], key: str, size: int) -> bytes:
    value = doc.get(key)
    if not isinstance(value, str):
        raise HttpError(400, api.REASON_BAD_REQUEST, f"field {key!r} must be a base64 string")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise HttpError(400, api.REASON_BAD_REQUEST, f"field {key!r} is not base64") from None
    if len(raw) != size:
        raise HttpError(400, api.REASON_BAD_REQUEST, f"field {key!r} must be {size} bytes")
    return raw


def _heartbeat_status(doc: dict[str, Any]) -> dict[str, Any]:
    """The known heartbeat fields, type-checked; anything else is dropped, never stored.

    Whitelisting here is what keeps the platform's heartbeat store free of scan data or
    secrets even if a future agent sent more than it should.
    """

    def bad(name: str, what: str) -> HttpError:
        return HttpError(400, api.REASON_BAD_REQUEST, f"heartbeat field {name!r} must be {what}")

    def number(name: str) -> float:
        v = doc.get(name)
        if not isinstance(v, int | float) or isinstance(v, bool) or not -1e12 < v < 1e12:
            raise bad(name, "a number")
        return float(v)

    def count(name: str, nullable: bool = False) -> int | None:
        v = doc.get(name)
        if v is None and nullable:
            return None
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**63:
            raise bad(name, "a non-negative integer")
        return v

    def text(name: str, limit: int, nullable: bool = True) -> str | None:
        v = doc.get(name)
        if v is None and nullable:
            return None
        if not isinstance(v, str) or len(v) > limit:
            raise bad(name, f"a string of at most {limit} characters")
        return "".join(ch if ch.isprintable() else "?" for ch in v)

    def usage(name: str) -> dict[str, int] | None:
        v = doc.get(name)
        if v is None:
            return None
        if not isinstance(v, dict):
            raise bad(name, "an object {used, total} or null")
        used, total = v.get(api.HB_USED), v.get(api.HB_TOTAL)
        if not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**63 for x in (used, total)):
            raise bad(name, "an object of two non-negative integers {used, total}")
        return {api.HB_USED: int(used), api.HB_TOTAL: int(total)}  # type: ignore[arg-type]

    return {
        api.HB_AGENT_VERSION: text(api.HB_AGENT_VERSION, api.MAX_AGENT_VERSION, nullable=False),
        api.HB_BOOT_SESSION: text(api.HB_BOOT_SESSION, 128),
        api.HB_BOOT_COUNTER: count(api.HB_BOOT_COUNTER, nullable=True),
        api.HB_UPTIME: number(api.HB_UPTIME),
        api.HB_TIME_OFFSET: number(api.HB_TIME_OFFSET),
        api.HB_SCRATCH: usage(api.HB_SCRATCH),
        api.HB_VOLUME: usage(api.HB_VOLUME),
        api.HB_JOBS_DONE: count(api.HB_JOBS_DONE),
        api.HB_JOBS_FAILED: count(api.HB_JOBS_FAILED),
        api.HB_LAST_ERROR: text(api.HB_LAST_ERROR, api.MAX_LAST_ERROR),
    }


def _hybrid_field(doc: dict[str, Any]) -> bytes:
    raw = _b64_field(doc, api.F_HYBRID_PUBLIC, sealing.HYBRID_PUBLIC_LEN)
    try:
        sealing.load_hybrid_public_key(raw)  # refuse a key nothing could be sealed to
    except sealing.SealError:
        raise HttpError(400, api.REASON_BAD_REQUEST, "hybrid_public is not a usable ML-KEM-768 + X25519 key") from None
    return raw


def _str_field(doc: dict[str, Any], key: str, max_len: int) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise HttpError(400, api.REASON_BAD_REQUEST, f"field {key!r} must be a string of 1-{max_len} chars")
    return value


class PlatformApp:
    """Dispatches one parsed request to its endpoint."""

    def __init__(self, database: Database, authority: ca.CA, kek: bytes, config: AppConfig):
        self.db = database
        self.ca = authority
        self._kek = kek
        self.config = config
        self.waker = JobWaker(database, config.poll_interval)
        self.attestation = AttestationEndpoints(database, BootNonces(kek))
        self.volume_key = VolumeKeyEndpoints(database, kek)
        # The table's handlers bound to this app, by template and method.
        self._routes: dict[str, dict[str, Handler]] = {}
        for route in routes.ROUTES:
            handler = getattr(self, route.handler, None)
            if not callable(handler):
                raise TypeError(f"route {route.method} {route.template}: no handler {route.handler!r}")
            self._routes.setdefault(route.template, {})[route.method] = handler

    def __repr__(self) -> str:
        return "PlatformApp()"

    async def run_background(self) -> None:
        """The app's own tasks (the long-poll waker); runs until cancelled."""
        await self.waker.run()

    async def handle(self, ex: Exchange, peer_der: bytes | None) -> Response:
        """Route a request (headers read, body not yet) to its handler, after checking that
        its caller may call it (and has the session it needs), as its route row says."""
        try:
            found = _TABLE.find(ex.method, ex.path)
        except routes.NoRoute as e:
            raise HttpError(404, api.REASON_NOT_FOUND, e.text) from None
        except routes.WrongMethod as e:
            allow = ", ".join(e.allow)
            raise HttpError(405, api.REASON_METHOD_NOT_ALLOWED, f"use {allow}", {"allow": allow}) from None
        route = found.route
        caller: db.Appliance | None
        if route.caller is routes.Caller.APPLIANCE:
            caller = await self._required(peer_der)
            if route.session:
                await self._check_session(ex, caller)
        else:
            # Even where no certificate is needed, one that was presented is checked.
            known = await self.identify(peer_der, required=False)
            caller = known if route.caller is routes.Caller.OPTIONAL else None
        return await self._routes[route.template][route.method](ex, caller, *found.values)

    # --- identity ---

    async def identify(self, peer_der: bytes | None, *, required: bool) -> db.Appliance | None:
        """The appliance of the verified client certificate (HttpError when not acceptable).

        The TLS layer already verified the chain to our CA; here we check that the
        certificate is the one on record for an active appliance and not revoked.
        """
        if peer_der is None:
            if required:
                raise HttpError(
                    401,
                    api.REASON_CLIENT_CERT_REQUIRED,
                    "this endpoint needs the appliance's client certificate (mutual TLS)",
                )
            return None
        fp = ca.fingerprint(peer_der)
        serial = ca.serial_of(peer_der)

        revoked, app = await self.db.run(self.db.storage.identify, serial, fp)
        if revoked or (app is not None and app.state == db.STATE_DEACTIVATED):
            raise HttpError(403, api.REASON_DEACTIVATED, "this appliance is deactivated")
        if app is None or app.state != db.STATE_ACTIVE:
            raise HttpError(
                403, api.REASON_UNKNOWN_CERTIFICATE, "client certificate is not on record for any appliance"
            )
        return app

    async def _required(self, peer_der: bytes | None) -> db.Appliance:
        app = await self.identify(peer_der, required=True)
        assert app is not None  # identify(required=True) raises instead of returning None
        return app

    async def _check_session(self, ex: Exchange, app: db.Appliance) -> None:
        """The caller must present the token of its latest session (clone detection)."""
        token = ex.headers.get(api.HEADER_SESSION, "")
        if not token:
            raise HttpError(
                428, api.REASON_SESSION_REQUIRED, f"open a session first (POST {api.PATH_SESSION})"
            )
        verdict = await self.db.run(self.db.storage.check_session, app.id, _token_hash(token), time.time())
        if verdict is db.SessionVerdict.QUARANTINED:
            log.warning("request refused appliance=%s reason=quarantined path=%s", app.name, ex.path)
            raise HttpError(403, api.REASON_QUARANTINED, _QUARANTINED_TEXT)
        if verdict is db.SessionVerdict.UNKNOWN:
            raise HttpError(
                428, api.REASON_SESSION_REQUIRED, f"unknown session; open one (POST {api.PATH_SESSION})"
            )

    # --- endpoints ---

    async def post_session(self, ex: Exchange, app: db.Appliance) -> Response:
        """POST /v1/session: {boot_counter, keystore[, nonce, quote, counter]} -> {session}.

        An enrolled appliance's counter is the TPM-certified one (attest_endpoints); a counter
        that goes back or jumps quarantines.
        """
        doc = await ex.read_json()
        counter = doc.get(api.F_BOOT_COUNTER)
        keystore = doc.get(api.F_KEYSTORE)
        if not isinstance(counter, int) or isinstance(counter, bool) or not 1 <= counter <= api.MAX_BOOT_COUNTER:
            raise HttpError(400, api.REASON_BAD_REQUEST, f"field {api.F_BOOT_COUNTER!r} must be a positive integer")
        if keystore not in api.KEYSTORES:
            raise HttpError(400, api.REASON_BAD_REQUEST, f"field {api.F_KEYSTORE!r} must be one of {api.KEYSTORES}")
        if await self.db.run(self.db.storage.quarantined_at, app.id) is not None:
            raise HttpError(403, api.REASON_QUARANTINED, _QUARANTINED_TEXT)  # before a nonce is used up
        counter, attested = await self.attestation.session_counter(app, doc, counter)
        token = secrets.token_urlsafe(32)
        now = time.time()
        verdict = await self.db.run(
            functools.partial(
                self.db.storage.open_session, app.id, _token_hash(token), counter, keystore, now,
                attested=attested, public_id=api.session_id(token),
            )
        )  # fmt: skip
        if verdict is db.SessionVerdict.QUARANTINED:
            log.warning("session refused appliance=%s reason=quarantined boot_counter=%d", app.name, counter)
            raise HttpError(403, api.REASON_QUARANTINED, _QUARANTINED_TEXT)
        if attested:
            await self.db.run(self.db.storage.record_verified_boot, app.id, now)
        log.info(
            "session opened appliance=%s boot_counter=%d keystore=%s attested=%s",
            app.name, counter, keystore, "yes" if attested else "no",
        )  # fmt: skip
        return json_response(200, {api.F_SESSION: token})

    async def post_session_nonce(self, ex: Exchange, app: db.Appliance) -> Response:
        """POST /v1/session/nonce: a fresh nonce for the next session's TPM evidence."""
        await ex.read_json()
        return json_response(200, await self.attestation.nonce(app))

    async def post_boot_nonce(self, ex: Exchange, _caller: None) -> Response:
        """POST /v1/attestation/boot-nonce (anonymous): a stateless nonce for a boot report."""
        await ex.read_json()
        return json_response(200, self.attestation.boot_nonce())

    async def post_boot_report(self, ex: Exchange, _caller: None) -> Response:
        """POST /v1/attestation/boot-report (anonymous): a PCR-mismatch quote -> verdict."""
        return json_response(200, await self.attestation.boot_report(await ex.read_json()))

    async def post_attest_enroll(self, ex: Exchange, app: db.Appliance) -> Response:
        """POST /v1/attestation/enroll: EK certificate, AK, key objects -> MakeCredential."""
        return json_response(200, await self.attestation.enroll(app, await ex.read_json()))

    async def post_attest_activate(self, ex: Exchange, app: db.Appliance) -> Response:
        """POST /v1/attestation/activate: Certify + baseline quote -> attested."""
        return json_response(200, await self.attestation.activate(app, await ex.read_json()))

    async def post_certificate(self, ex: Exchange, app: db.Appliance) -> Response:
        """POST /v1/appliance/certificate: {csr} -> {certificate}; the caller's cert is revoked."""
        doc = await ex.read_json()
        csr_pem = _str_field(doc, api.F_CSR, 16 * 1024)
        try:
            csr = ca.check_csr(csr_pem.encode("ascii"))
        except (ca.CAError, UnicodeEncodeError) as e:
            raise HttpError(400, api.REASON_BAD_REQUEST, f"csr: {e}") from None

        def issue(name: str) -> tuple[bytes, str, str]:
            cert = ca.issue_client_cert(self.ca, csr, name)
            return cert.pem, cert.serial, cert.fingerprint

        try:
            cert_pem = await self.db.run(self.db.storage.renew_certificate, app.id, time.time(), issue)
        except db.NotFound:
            raise HttpError(403, api.REASON_DEACTIVATED, "this appliance is deactivated") from None
        log.info("certificate renewed appliance=%s old_serial=%s", app.name, app.cert_serial)
        return json_response(200, {api.F_CERTIFICATE: cert_pem.decode()})

    async def get_time(self, ex: Exchange, _app: db.Appliance | None) -> Response:
        """GET /v1/time: platform UTC epoch seconds."""
        return json_response(200, {api.F_TIME: time.time()})

    async def post_activate(self, ex: Exchange, _caller: None) -> Response:
        """POST /v1/activate: code + CSR + X25519 key -> client certificate."""
        doc = await ex.read_json()
        code = _str_field(doc, api.F_CODE, 64)
        csr_pem = _str_field(doc, api.F_CSR, 16 * 1024)
        x_pub = _b64_field(doc, api.F_X25519_PUBLIC, sealing.KEY_LEN)
        # Optional so that agents from before sealing v2 can still activate (v1 only).
        hybrid = _hybrid_field(doc) if api.F_HYBRID_PUBLIC in doc else None
        try:
            csr = ca.check_csr(csr_pem.encode("ascii"))
        except (ca.CAError, UnicodeEncodeError) as e:
            raise HttpError(400, api.REASON_BAD_REQUEST, f"csr: {e}") from None
        now = time.time()

        def issue(name: str) -> tuple[bytes, str, str]:
            cert = ca.issue_client_cert(self.ca, csr, name)
            return cert.pem, cert.serial, cert.fingerprint

        wrap_new = functools.partial(keys.wrap_new, self._kek)
        try:
            grant = await self.db.run(
                self.db.storage.activate, ca.code_hash(code), now, x_pub, issue, wrap_new, hybrid
            )
        except db.NotFound:
            log.info("event=activation_refused reason=invalid_code")
            raise HttpError(403, api.REASON_INVALID_CODE, "activation code is unknown or was used already") from None
        except db.Conflict:
            log.info("event=activation_refused reason=code_expired")
            raise HttpError(403, api.REASON_CODE_EXPIRED, "activation code has expired") from None
        syslog = await self.db.run(self.db.storage.get_setting, "syslog")
        log.info("event=appliance_activated appliance=%s serial=%s", grant.appliance.name, grant.appliance.cert_serial)
        return json_response(
            200,
            {
                api.F_APPLIANCE: grant.appliance.name,
                api.F_CERTIFICATE: grant.cert_pem.decode(),
                api.F_CA: self.ca.cert_pem.decode(),
                api.F_SYSLOG: _syslog_doc(syslog),
            },
        )

    async def get_keyslot_passphrase(self, ex: Exchange, app: db.Appliance) -> Response:
        """GET /v1/volume-key: the caller's part of its volume key, sealed to it (volume_key_endpoints)."""
        return json_response(200, await self.volume_key.current(app))

    async def post_volume_key_next(self, ex: Exchange, app: db.Appliance) -> Response:
        """POST /v1/volume-key/next: the pending platform share, created on the first call."""
        await ex.read_json()  # an empty object; nothing in it is used
        return json_response(200, await self.volume_key.next_share(app))

    async def post_volume_key_commit(self, ex: Exchange, app: db.Appliance) -> Response:
        """POST /v1/volume-key/commit {epoch}: that epoch becomes current; the old part is destroyed."""
        return json_response(200, await self.volume_key.commit(app, await ex.read_json()))

    async def post_seal_key(self, ex: Exchange, app: db.Appliance) -> Response:
        """POST /v1/appliance/seal-key: the caller's hybrid public key (sealing v2).

        Authenticated by the client certificate, so only the appliance itself can set it;
        idempotent for the same key (an upgrade that crashed after sending may resend).
        """
        doc = await ex.read_json()
        public = _hybrid_field(doc)
        try:
            changed = await self.db.run(self.db.storage.set_hybrid_public, app.id, public, time.time())
        except db.Conflict:
            raise HttpError(
                409, api.REASON_KEY_CONFLICT, "a different hybrid key is on record for this appliance"
            ) from None
        except db.NotFound:
            raise HttpError(403, api.REASON_UNKNOWN_CERTIFICATE, "appliance is not active") from None
        log.info("event=seal_key_upgraded appliance=%s changed=%s", app.name, changed)
        return json_response(200, {api.F_APPLIANCE: app.name})

    async def get_config(self, ex: Exchange, app: db.Appliance) -> Response:
        """GET /v1/config: syslog target and heartbeat interval."""
        syslog = await self.db.run(self.db.storage.get_setting, "syslog")
        policy = await self.db.run(health.Policy.load, self.db.storage)
        return json_response(200, {api.F_SYSLOG: _syslog_doc(syslog), api.F_HEARTBEAT_INTERVAL: policy.interval})

    async def post_heartbeat(self, ex: Exchange, app: db.Appliance) -> Response:
        """POST /v1/heartbeat: store the caller's health; answer with the current interval.

        In session like the job and key endpoints: a quarantined appliance is refused (403
        quarantined, nothing recorded: its health shows ``quarantined``), and a beat from
        a superseded session is a clone sign like any other request from one.
        """
        status = _heartbeat_status(await ex.read_json())
        token = ex.headers.get(api.HEADER_SESSION, "")  # present and current: the dispatcher checked
        counter = await self.db.run(self.db.storage.session_boot_counter, app.id, _token_hash(token))
        claimed = (status[api.HB_BOOT_SESSION], status[api.HB_BOOT_COUNTER])
        # Record the session that authenticated this beat, not what the body claims.
        status[api.HB_BOOT_SESSION] = api.session_id(token)
        status[api.HB_BOOT_COUNTER] = counter
        if claimed != (status[api.HB_BOOT_SESSION], counter):
            log.warning(
                "heartbeat session fields differ from its session appliance=%s boot_counter=%s claimed=%s",
                app.name, counter, claimed[1],
            )  # fmt: skip
        if not await self.db.run(self.db.storage.record_heartbeat, app.id, status, time.time()):
            log.warning("request refused appliance=%s reason=quarantined path=%s", app.name, ex.path)
            raise HttpError(403, api.REASON_QUARANTINED, _QUARANTINED_TEXT)
        policy = await self.db.run(health.Policy.load, self.db.storage)
        return json_response(200, {api.F_HEARTBEAT_INTERVAL: policy.interval})

    async def get_next_job(self, ex: Exchange, app: db.Appliance) -> Response:
        """GET /v1/jobs/next?wait=S: lease the next job, long-polling up to S seconds."""
        raw = ex.query.get(api.QUERY_WAIT, ["0"])[-1]
        try:
            wait = float(raw[:32])
        except ValueError:
            raise HttpError(400, api.REASON_BAD_REQUEST, "wait must be a number") from None
        if not 0.0 <= wait <= api.MAX_WAIT_SECONDS:  # also refuses NaN
            raise HttpError(400, api.REASON_BAD_REQUEST, f"wait must be between 0 and {api.MAX_WAIT_SECONDS:g}")
        deadline = trio.current_time() + wait
        while True:
            # Listen first, then look: a job queued in between still sets the event.
            with self.waker.listen(app.id) as woken:
                job = await self.db.run(self.db.storage.lease_next, app.id, time.time(), self.config.lease_seconds)
                if job is not None:
                    log.info("event=job_leased appliance=%s job=%d attempt=%d", app.name, job.id, job.attempts)
                    return json_response(200, {api.F_JOB: self._job_doc(job)})
                remaining = deadline - trio.current_time()
                if remaining <= 0:
                    return Response(204)
                with trio.move_on_after(remaining):
                    await woken.wait()

    @staticmethod
    def _job_doc(job: db.JobRow) -> dict[str, Any]:
        cred = None
        if job.credential_name is not None and job.credential_sealed is not None:
            cred = {
                api.F_NAME: job.credential_name,
                api.F_SEALED: base64.b64encode(job.credential_sealed).decode(),
            }
        return {
            api.F_ID: str(job.id),
            api.F_TARGETS: job.targets,
            api.F_PORTS: job.ports,
            api.F_ENGINE: job.engine,
            api.F_CREDENTIAL: cred,
            api.F_LEASE_EXPIRES: job.lease_expires,
            api.F_ATTEMPT: job.attempts,
        }

    async def _own_job(self, app: db.Appliance, job_id: int) -> str:
        owner = await self.db.run(self.db.storage.job_owner, job_id)
        # Another appliance's job answers exactly like a job that does not exist.
        if owner is None or owner[0] != app.id or owner[1] == "cancelled":
            raise HttpError(404, api.REASON_NOT_FOUND, "no such job for this appliance")
        return owner[1]

    async def post_result(self, ex: Exchange, app: db.Appliance, job_id: int) -> Response:
        """POST /v1/jobs/{id}/result: body + X-Content-SHA256 -> stored once, digest ack."""
        claimed = ex.headers.get(api.HEADER_CONTENT_SHA256, "").strip().lower()
        if not api.SHA256_HEX_RE.match(claimed):
            raise HttpError(400, api.REASON_BAD_REQUEST, f"header {api.HEADER_CONTENT_SHA256} must be 64 hex digits")
        if ex.declared_length() is None and "chunked" not in ex.headers.get("transfer-encoding", ""):
            raise HttpError(411, api.REASON_LENGTH_REQUIRED, "send Content-Length or chunked transfer encoding")
        await self._own_job(app, job_id)
        h = hashlib.sha256()
        body = bytearray()
        async for chunk in ex.iter_body(self.config.max_result_bytes):
            h.update(chunk)
            body += chunk
        actual = h.hexdigest()
        if not hmac.compare_digest(actual, claimed):
            log.info("event=result_refused appliance=%s job=%d reason=digest_mismatch", app.name, job_id)
            raise HttpError(400, api.REASON_DIGEST_MISMATCH, "body does not match its SHA-256; nothing stored")
        outcome = await self.db.run(self.db.storage.complete_job, job_id, app.id, actual, bytes(body), time.time())
        if outcome is db.Completion.CONFLICT:
            raise HttpError(409, api.REASON_ALREADY_COMPLETED, "job already has a different result")
        log.info(
            "event=result_stored appliance=%s job=%d bytes=%d outcome=%s", app.name, job_id, len(body), outcome.value
        )
        return json_response(200, {api.F_SHA256: actual, api.F_JOB: str(job_id)})

    async def post_progress(self, ex: Exchange, app: db.Appliance, job_id: int) -> Response:
        """POST /v1/jobs/{id}/progress: {"text": ...} -> 204."""
        await self._own_job(app, job_id)
        doc = await ex.read_json()
        value = doc.get(api.F_TEXT)
        if not isinstance(value, str) or len(value) > api.MAX_PROGRESS_TEXT:
            raise HttpError(
                400, api.REASON_BAD_REQUEST, f"field 'text' must be a string of at most {api.MAX_PROGRESS_TEXT}"
            )
        try:
            await self.db.run(self.db.storage.set_progress, job_id, app.id, value, time.time())
        except db.NotFound:
            raise HttpError(404, api.REASON_NOT_FOUND, "no such job for this appliance") from None
        return Response(204)
