"""The attestation endpoints' work: request fields in, storage records and verdicts out.

`handlers.PlatformApp` routes the requests here (enrollment, nonces) and asks
`session_counter` for the counter of every session it opens. Verification itself is
`tools.platform.attestation` (pure); records are `db.attestation`. Every refusal is an
HttpError with a documented reason (docs/platform.md "Attestation") and an audit event.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from protocol import api
from tools.platform import attestation as at
from tools.platform import ca, db
from tools.platform.boot_nonce import BootNonces, NonceRejected
from tools.platform.db import ATTEST_ATTESTED, SETTING_EK_CA
from tools.platform.http import HttpError

if TYPE_CHECKING:
    from tools.platform.handlers import Database

log = logging.getLogger("scanner-platform")


def _bad(message: str) -> HttpError:
    return HttpError(400, api.REASON_BAD_REQUEST, message)


def _b64(doc: dict[str, Any], key: str, limit: int) -> bytes:
    value = doc.get(key)
    if not isinstance(value, str) or len(value) > (limit * 4) // 3 + 4:
        raise _bad(f"field {key!r} must be a base64 string of at most {limit} bytes")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(f"field {key!r} is not base64") from None
    if not raw or len(raw) > limit:
        raise _bad(f"field {key!r} must hold 1-{limit} bytes")
    return raw


def _evidence(doc: dict[str, Any], key: str) -> tuple[bytes, bytes, dict[str, Any]]:
    ev = doc.get(key)
    if not isinstance(ev, dict):
        raise _bad(f"field {key!r} must be an object with {api.F_ATTEST!r} and {api.F_SIGNATURE!r}")
    return _b64(ev, api.F_ATTEST, api.MAX_EVIDENCE), _b64(ev, api.F_SIGNATURE, api.MAX_EVIDENCE), ev


def _pcr_values(ev: dict[str, Any]) -> list[bytes] | None:
    # What the appliance says the quoted PCRs hold; kept only if they hash to the signed digest.
    values = ev.get(api.F_PCR_VALUES)
    if values is None:
        return None
    if not isinstance(values, list) or len(values) > api.MAX_PCR_INDEX + 1 or not all(
        isinstance(v, str) and api.SHA256_HEX_RE.match(v) for v in values
    ):
        raise _bad(f"field {api.F_PCR_VALUES!r} must list at most {api.MAX_PCR_INDEX + 1} hex SHA-256 values")
    return [bytes.fromhex(v) for v in values]


def _pcrs(doc: dict[str, Any]) -> tuple[int, ...]:
    pcrs = doc.get(api.F_PCRS)
    if (
        not isinstance(pcrs, list)
        or len(pcrs) > api.MAX_PCR_INDEX + 1
        or not all(isinstance(p, int) and not isinstance(p, bool) and 0 <= p <= api.MAX_PCR_INDEX for p in pcrs)
        or len(set(pcrs)) != len(pcrs)
    ):
        raise _bad(f"field {api.F_PCRS!r} must list distinct PCR indices 0-{api.MAX_PCR_INDEX}")
    return tuple(sorted(pcrs))


class AttestationEndpoints:
    """Enrollment, nonces and session evidence for `handlers.PlatformApp`."""

    def __init__(self, database: Database, boot_nonces: BootNonces) -> None:
        self.db = database
        self.boot_nonces = boot_nonces

    def __repr__(self) -> str:
        return "AttestationEndpoints()"

    async def _refuse(self, app: db.Appliance, err: at.AttestationError, step: str, status: int = 403) -> HttpError:
        log.warning("event=attestation_refused appliance=%s step=%s reason=%s", app.name, step, err.reason)
        detail = f"{step}: {err.message}"
        await self.db.run(self.db.storage.log_attestation_refused, app.id, err.reason, detail, time.time())
        return HttpError(status, err.reason, err.message)

    async def _record_mismatch(self, app: db.Appliance, quote: at.Quote, now: float, source: str) -> None:
        # One owner for "a verified quote differs from the baseline", whoever brought it.
        shown = None if quote.values is None else tuple(v.hex() for v in quote.values)
        await self.db.run(self.db.storage.record_pcr_mismatch, app.id, shown, quote.digest, now)
        log.warning(
            "event=pcr_mismatch appliance=%s quoted_digest=%s source=%s", app.name, quote.digest.hex(), source
        )

    async def nonce(self, app: db.Appliance) -> dict[str, Any]:
        """POST PATH_SESSION_NONCE: a fresh nonce, replacing any unused one."""
        nonce = secrets.token_bytes(api.NONCE_BYTES)
        await self.db.run(self.db.storage.issue_nonce, app.id, nonce, time.time() + api.NONCE_TTL)
        return {api.F_NONCE: base64.b64encode(nonce).decode("ascii")}

    async def enroll(self, app: db.Appliance, doc: dict[str, Any]) -> dict[str, Any]:
        """POST PATH_ATTEST_ENROLL: check the EK certificate, AK and key objects; MakeCredential."""
        bundle = await self.db.run(self.db.storage.get_setting, SETTING_EK_CA)
        if not isinstance(bundle, str):
            raise HttpError(
                409, api.REASON_ATTESTATION_UNAVAILABLE,
                "this platform trusts no EK CA (operator: 'scanner-platform ek-ca set FILE')",
            )  # fmt: skip
        cas = at.load_ek_cas(bundle.encode())
        ek_der = _b64(doc, api.F_EK_CERTIFICATE, api.MAX_EK_CERTIFICATE)
        ak_raw = _b64(doc, api.F_AK_PUBLIC, api.MAX_EVIDENCE)
        kek_raw = _b64(doc, api.F_KEK_PUBLIC, api.MAX_EVIDENCE)
        counter_raw = _b64(doc, api.F_COUNTER_PUBLIC, api.MAX_EVIDENCE)
        pcrs = api.attested_pcrs(_pcrs(doc))  # recorded as quoted: later quotes must cover exactly these
        base = doc.get(api.F_COUNTER_BASE)
        if not isinstance(base, int) or isinstance(base, bool) or not 0 <= base <= api.MAX_BOOT_COUNTER // 2:
            raise _bad(f"field {api.F_COUNTER_BASE!r} must be an integer >= 0")
        cert_pem = doc.get(api.F_CERTIFICATE)
        if not isinstance(cert_pem, str) or len(cert_pem) > 8192:
            raise _bad(f"field {api.F_CERTIFICATE!r} must be the appliance's client certificate (PEM)")
        try:
            cert = x509.load_pem_x509_certificate(cert_pem.encode())
        except ValueError:
            raise _bad(f"field {api.F_CERTIFICATE!r} is not a PEM certificate") from None
        if ca.fingerprint(cert.public_bytes(serialization.Encoding.DER)) != app.cert_fingerprint:
            raise _bad(f"field {api.F_CERTIFICATE!r} is not the certificate this connection presented")
        try:
            ek_cert = at.verify_ek_certificate(ek_der, cas, time.time())
            ek = at.ek_public(ek_cert)
            ak_name = at.check_ak(at.parse_public(ak_raw, "the AK public area"))
            kek_name = at.check_sealed_key(at.parse_public(kek_raw, "the sealed key's public area"))
            counter = at.counter_name(counter_raw)
        except at.AttestationError as e:
            raise await self._refuse(app, e, "enroll") from None
        challenge = at.make_challenge(ek, ak_name)
        tls_public = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        binding = api.attestation_binding(
            challenge.secret, tls_public, app.x25519_public or b"", app.hybrid_public or b""
        )
        refused = await self.db.run(
            self.db.storage.begin_enrollment, app.id, ek_der, hashlib.sha256(ek_der).hexdigest(), ak_raw,
            kek_name, counter, base, pcrs, binding, time.time() + api.NONCE_TTL,
        )  # fmt: skip
        if refused is not None:
            log.warning("event=attestation_refused appliance=%s step=enroll detail=%s", app.name, refused)
            raise HttpError(409, api.REASON_ALREADY_ENROLLED, refused)
        return {
            api.F_CREDENTIAL_BLOB: base64.b64encode(challenge.credential_blob).decode("ascii"),
            api.F_ENCRYPTED_SECRET: base64.b64encode(challenge.encrypted_secret).decode("ascii"),
        }

    async def activate(self, app: db.Appliance, doc: dict[str, Any]) -> dict[str, Any]:
        """POST PATH_ATTEST_ACTIVATE: the AK's Certify of the KEK and baseline quote, over the binding."""
        record = await self.db.run(self.db.storage.attestation, app.id)
        if record is None or record.state == ATTEST_ATTESTED:
            raise HttpError(409, api.REASON_ALREADY_ENROLLED if record else api.REASON_ATTESTATION_INVALID,
                            "no enrollment of this appliance is in progress")  # fmt: skip
        c_attest, c_sig, _ = _evidence(doc, api.F_CERTIFY)
        q_attest, q_sig, q_doc = _evidence(doc, api.F_QUOTE)
        pcrs = record.pcrs
        values = _pcr_values(q_doc)
        try:
            ak = at.parse_public(record.ak_public, "the AK public area")
            binding = at.qualifying_data(c_attest)
            if not await self.db.run(self.db.storage.challenge_matches, app.id, binding, time.time()):
                raise at.AttestationError(
                    api.REASON_NONCE_INVALID,
                    "the certification is not over this enrollment's challenge (or the challenge expired)",
                )
            at.verify_certify(c_attest, c_sig, ak, record.kek_name, binding)
            quote = at.verify_quote(q_attest, q_sig, ak, binding, pcrs, values)
            if quote.values is None:
                raise at.AttestationError(api.REASON_ATTESTATION_INVALID, "the PCR values do not match the quote")
        except at.AttestationError as e:
            raise await self._refuse(app, e, "activate") from None
        shown = tuple(v.hex() for v in quote.values)
        if not await self.db.run(self.db.storage.complete_enrollment, app.id, shown, quote.digest, time.time()):
            raise HttpError(409, api.REASON_ALREADY_ENROLLED, "the enrollment was completed or replaced meanwhile")
        log.info("event=attestation_enrolled appliance=%s pcrs=%s", app.name, ",".join(map(str, pcrs)))
        return {api.F_ATTESTATION: ATTEST_ATTESTED}

    async def session_counter(self, app: db.Appliance, doc: dict[str, Any], claimed: int) -> tuple[int, bool]:
        """The boot counter a session is opened with, and whether it is attested.

        An enrolled appliance must prove the boot: a quote over its PCRs matching the
        baseline and a certification of its NV counter, both over its outstanding nonce;
        the counter is the certified one (*claimed*, the body's, is ignored). Anyone else
        gets *claimed*, unattested.
        """
        record = await self.db.run(self.db.storage.attestation, app.id)
        if record is None or record.state != ATTEST_ATTESTED:
            return claimed, False
        now = time.time()
        try:
            if doc.get(api.F_KEYSTORE) != "tpm" or api.F_QUOTE not in doc or api.F_COUNTER not in doc:
                raise at.AttestationError(
                    api.REASON_ATTESTATION_REQUIRED,
                    "this appliance's TPM is enrolled: a session needs its quote and counter certification",
                )
            nonce = _b64(doc, api.F_NONCE, api.NONCE_BYTES)
            q_attest, q_sig, q_doc = _evidence(doc, api.F_QUOTE)
            n_attest, n_sig, _ = _evidence(doc, api.F_COUNTER)
            pcrs = record.pcrs
            values = _pcr_values(q_doc)
            if not await self.db.run(self.db.storage.consume_nonce, app.id, nonce, now):
                raise at.AttestationError(
                    api.REASON_NONCE_INVALID,
                    f"unknown, used or expired nonce: get a fresh one (POST {api.PATH_SESSION_NONCE})",
                )
            ak = at.parse_public(record.ak_public, "the AK public area")
            quote = at.verify_quote(q_attest, q_sig, ak, nonce, pcrs, values)
            counter = at.verify_counter(n_attest, n_sig, ak, nonce, record.counter_name)
        except at.AttestationError as e:
            raise await self._refuse(app, e, "session") from None
        if record.pcr_digest is None or quote.digest != record.pcr_digest:
            await self._record_mismatch(app, quote, now, "session")
            raise HttpError(
                403, api.REASON_PCR_MISMATCH,
                "the quoted PCR values differ from this appliance's recorded baseline "
                "(operator: 'scanner-platform appliance baseline NAME')",
            )  # fmt: skip
        return record.counter_base + counter, True

    # -- boot reports (anonymous: the appliance's TPM refused to unseal its client key) --

    def boot_nonce(self) -> dict[str, Any]:
        """POST PATH_BOOT_NONCE: a stateless nonce (boot_nonce), for anyone."""
        return {api.F_NONCE: base64.b64encode(self.boot_nonces.issue(time.time())).decode("ascii")}

    async def boot_report(self, doc: dict[str, Any]) -> dict[str, Any]:
        """POST PATH_BOOT_REPORT: an appliance's quote over a boot nonce, made when its TPM
        refused to unseal. Recorded like a session's PCR mismatch if the AK enrolled for
        that appliance signed it over a fresh nonce and it differs from the baseline.

        Anonymous, so nothing is written for a report that does not verify (an audit row
        per forged request would be state anybody could make us allocate), and an unknown
        appliance is refused exactly like a bad signature (no name oracle).
        """
        name = doc.get(api.F_APPLIANCE)
        if not isinstance(name, str) or not api.NAME_RE.match(name):
            raise _bad(f"field {api.F_APPLIANCE!r} must be the appliance's name")
        nonce = _b64(doc, api.F_NONCE, api.NONCE_BYTES)
        q_attest, q_sig, q_doc = _evidence(doc, api.F_QUOTE)
        values = _pcr_values(q_doc)
        now = time.time()
        try:
            issued = self.boot_nonces.check(nonce, now)
        except NonceRejected as e:
            log.warning("event=boot_report_refused appliance=%s reason=nonce_invalid detail=%s", name, str(e))
            raise HttpError(
                403, api.REASON_NONCE_INVALID, f"{e}: get a fresh one (POST {api.PATH_BOOT_NONCE})"
            ) from None
        not_verified = HttpError(
            403, api.REASON_ATTESTATION_INVALID,
            "the quote is not signed by the attestation key enrolled for that appliance "
            "(unknown appliance, not attested, another TPM, or malformed evidence)",
        )  # fmt: skip
        app, record = await self._enrolled(name)
        if app is None or record is None:
            log.warning("event=boot_report_refused appliance=%s reason=attestation_invalid detail=not_enrolled", name)
            raise not_verified
        try:
            ak = at.parse_public(record.ak_public, "the AK public area")
            quote = at.verify_quote(q_attest, q_sig, ak, nonce, record.pcrs, values)
        except at.AttestationError as e:
            log.warning("event=boot_report_refused appliance=%s reason=%s detail=%s", name, e.reason, e.message)
            if e.reason == api.REASON_NONCE_INVALID:
                raise HttpError(403, e.reason, e.message) from None
            raise not_verified from None
        if not await self.db.run(self.db.storage.claim_boot_report, app.id, issued):
            log.warning("event=boot_report_refused appliance=%s reason=nonce_invalid detail=replayed", app.name)
            raise HttpError(403, api.REASON_NONCE_INVALID, "this nonce was used for a report already (replayed)")
        if record.pcr_digest is not None and quote.digest == record.pcr_digest:
            err = at.AttestationError(
                api.REASON_PCR_MATCH, "the quote matches this appliance's recorded baseline: there is no mismatch"
            )
            raise await self._refuse(app, err, "boot-report", 409)
        await self._record_mismatch(app, quote, now, "boot_report")
        return {api.F_VERDICT: api.VERDICT_PCR_MISMATCH}

    async def _enrolled(self, name: str) -> tuple[db.Appliance | None, db.Attestation | None]:
        """The active appliance called *name* and its completed attestation, or (None, None)."""
        try:
            app = await self.db.run(self.db.storage.appliance, name)
        except db.NotFound:
            return None, None
        if app.state != db.STATE_ACTIVE:
            return None, None
        record = await self.db.run(self.db.storage.attestation, app.id)
        if record is None or record.state != ATTEST_ATTESTED:
            return None, None
        return app, record
