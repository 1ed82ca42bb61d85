"""Remote attestation records: enrolled TPMs, PCR baselines, session nonces.

What is verified is decided in `tools.platform.attestation` (pure); this module only keeps
the records: per appliance the EK certificate, the AK public area, the names of the sealed
KEK object and of the NV boot counter, the PCR baseline and the last verified boot. Nothing
here is secret: the enrollment challenge is kept only as a hash of the binding it must
produce, and session nonces only as hashes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any, Final

from tools.platform.db.dialect import Conn
from tools.platform.db.events import Events, add_event

ATTEST_ENROLLING: Final = "enrolling"  # challenge sent, proof not yet received
ATTEST_ATTESTED: Final = "attested"
PCR_OK: Final = "ok"
PCR_MISMATCH: Final = "mismatch"
SETTING_EK_CA: Final = "ek_ca_pem"  # str: PEM bundle of the TPM manufacturers' CAs
EVENT_ENROLLED: Final = "attestation_enrolled"
EVENT_REFUSED: Final = "attestation_refused"
EVENT_PCR_MISMATCH: Final = "pcr_mismatch"
EVENT_BASELINE_CHANGED: Final = "pcr_baseline_changed"
EVENT_PCR_RESTORED: Final = "pcr_restored"  # a verified boot after a mismatch, without a new baseline


def _hash(data: bytes) -> bytes:
    return hashlib.sha256(b"scanner-attestation-store\x00" + data).digest()


@dataclass(frozen=True)
class Attestation:
    """An appliance's attestation record."""

    appliance_id: int
    state: str  # ATTEST_ENROLLING or ATTEST_ATTESTED
    ek_fingerprint: str
    ak_public: bytes
    kek_name: bytes
    counter_name: bytes
    counter_base: int
    pcrs: tuple[int, ...]  # the PCRs every quote must cover (api.attested_pcrs at enrollment)
    pcr_values: tuple[str, ...] | None  # hex, the baseline
    pcr_digest: bytes | None
    pcr_state: str
    pending_pcr_values: tuple[str, ...] | None  # hex, of the last quote refused for a mismatch
    pending_at: float | None
    enrolled_at: float | None
    last_verified: float | None


_SELECT: Final = (
    "SELECT appliance_id, state, ek_fingerprint, ak_public, kek_name, counter_name, counter_base, pcrs, "
    "pcr_values, pcr_digest, pcr_state, pending_pcr_values, pending_at, enrolled_at, last_verified "
    "FROM attestations"
)


def _record(r: Any) -> Attestation:
    def values(text: str | None) -> tuple[str, ...] | None:
        return None if text is None else tuple(json.loads(text))

    return Attestation(
        appliance_id=r[0], state=r[1], ek_fingerprint=r[2], ak_public=bytes(r[3]), kek_name=bytes(r[4]),
        counter_name=bytes(r[5]), counter_base=int(r[6]), pcrs=tuple(json.loads(r[7])),
        pcr_values=values(r[8]), pcr_digest=None if r[9] is None else bytes(r[9]), pcr_state=r[10],
        pending_pcr_values=values(r[11]), pending_at=r[12], enrolled_at=r[13], last_verified=r[14],
    )  # fmt: skip


def _event(db: Conn, now: float, appliance_id: int, kind: str, detail: str) -> None:
    add_event(db, now, appliance_id, kind, detail)


class Attestations(Events):
    """Attestation records (one transaction per method)."""

    def attestation(self, appliance_id: int) -> Attestation | None:
        """The appliance's attestation record, or None (never enrolled)."""
        with self._read() as db:
            row = db.execute(_SELECT + " WHERE appliance_id = ?", (appliance_id,)).fetchone()
        return None if row is None else _record(row)

    def attestations(self) -> dict[int, Attestation]:
        """Every attestation record, by appliance id."""
        with self._read() as db:
            return {r[0]: _record(r) for r in db.execute(_SELECT).fetchall()}

    def begin_enrollment(
        self,
        appliance_id: int,
        ek_certificate: bytes,
        ek_fingerprint: str,
        ak_public: bytes,
        kek_name: bytes,
        counter_name: bytes,
        counter_base: int,
        pcrs: tuple[int, ...],
        binding: bytes,
        expires: float,
    ) -> str | None:
        """Record a challenge sent to an appliance's TPM. Returns None, or why it is refused:
        the appliance is attested already, or this EK belongs to another appliance."""
        with self._tx() as db:
            row = db.execute(
                "SELECT state FROM attestations WHERE appliance_id = ? FOR UPDATE", (appliance_id,)
            ).fetchone()
            if row is not None and row[0] == ATTEST_ATTESTED:
                return "this appliance's TPM is enrolled already"
            other = db.execute(
                "SELECT a.name FROM attestations t JOIN appliances a ON a.id = t.appliance_id "
                "WHERE t.ek_fingerprint = ? AND t.appliance_id <> ? AND t.state = ? AND a.state = 'active'",
                (ek_fingerprint, appliance_id, ATTEST_ATTESTED),
            ).fetchone()
            if other is not None:
                return f"this TPM is enrolled as appliance {other[0]!r}"
            args = (
                ATTEST_ENROLLING, ek_certificate, ek_fingerprint, ak_public, kek_name, counter_name,
                counter_base, json.dumps(list(pcrs)), _hash(binding), expires,
            )  # fmt: skip
            if row is None:
                db.execute(
                    "INSERT INTO attestations (state, ek_certificate, ek_fingerprint, ak_public, kek_name, "
                    "counter_name, counter_base, pcrs, challenge_hash, challenge_expires, appliance_id) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (*args, appliance_id),
                )
            else:
                db.execute(
                    "UPDATE attestations SET state = ?, ek_certificate = ?, ek_fingerprint = ?, ak_public = ?, "
                    "kek_name = ?, counter_name = ?, counter_base = ?, pcrs = ?, challenge_hash = ?, "
                    "challenge_expires = ? WHERE appliance_id = ?",
                    (*args, appliance_id),
                )
        return None

    def challenge_matches(self, appliance_id: int, binding: bytes, now: float) -> bool:
        """Whether *binding* is what the appliance's open enrollment challenge must produce."""
        with self._read() as db:
            row = db.execute(
                "SELECT challenge_hash, challenge_expires FROM attestations WHERE appliance_id = ? AND state = ?",
                (appliance_id, ATTEST_ENROLLING),
            ).fetchone()
        if row is None or row[0] is None or row[1] is None or now > float(row[1]):
            return False
        return bool(hmac.compare_digest(bytes(row[0]), _hash(binding)))

    def complete_enrollment(self, appliance_id: int, values: tuple[str, ...], digest: bytes, now: float) -> bool:
        """The proof verified: the appliance is attested with this PCR baseline."""
        with self._tx() as db:
            done = db.execute(
                "UPDATE attestations SET state = ?, challenge_hash = NULL, challenge_expires = NULL, "
                "pcr_values = ?, pcr_digest = ?, pcr_state = ?, pending_pcr_values = NULL, pending_at = NULL, "
                "enrolled_at = ? WHERE appliance_id = ? AND state = ?",
                (ATTEST_ATTESTED, json.dumps(list(values)), digest, PCR_OK, now, appliance_id, ATTEST_ENROLLING),
            ).rowcount
            if done == 1:
                _event(db, now, appliance_id, EVENT_ENROLLED, f"pcr_digest={digest.hex()}")
        return bool(done == 1)

    def issue_nonce(self, appliance_id: int, nonce: bytes, expires: float) -> None:
        """Remember *nonce* (hashed) as the appliance's one outstanding session nonce."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO session_nonces (appliance_id, nonce_hash, expires) VALUES (?, ?, ?) "
                "ON CONFLICT (appliance_id) DO UPDATE SET nonce_hash = excluded.nonce_hash, "
                "expires = excluded.expires",
                (appliance_id, _hash(nonce), expires),
            )

    def consume_nonce(self, appliance_id: int, nonce: bytes, now: float) -> bool:
        """Whether *nonce* is the appliance's outstanding, unexpired nonce; it is used up either way."""
        with self._tx() as db:
            row = db.execute(
                "SELECT nonce_hash, expires FROM session_nonces WHERE appliance_id = ? FOR UPDATE", (appliance_id,)
            ).fetchone()
            if row is None:
                return False
            db.execute("DELETE FROM session_nonces WHERE appliance_id = ?", (appliance_id,))
        return now <= float(row[1]) and hmac.compare_digest(bytes(row[0]), _hash(nonce))

    def record_pcr_mismatch(self, appliance_id: int, values: tuple[str, ...] | None, digest: bytes, now: float) -> None:
        """A verified quote showed other PCRs than the baseline: state ``mismatch``, values kept
        for the operator (``appliance baseline``) when the appliance's values hash to the quote."""
        with self._tx() as db:
            db.execute(
                "UPDATE attestations SET pcr_state = ?, pending_pcr_values = ?, pending_at = ? WHERE appliance_id = ?",
                (PCR_MISMATCH, None if values is None else json.dumps(list(values)), now, appliance_id),
            )
            _event(db, now, appliance_id, EVENT_PCR_MISMATCH, f"quoted_digest={digest.hex()}")

    def claim_boot_report(self, appliance_id: int, issued: int) -> bool:
        """Whether a boot report whose nonce was issued at *issued* (microseconds) is newer
        than the last one accepted for the appliance; if so it becomes the last one."""
        with self._tx() as db:
            done = db.execute(
                "UPDATE attestations SET boot_report_issued = ? WHERE appliance_id = ? "
                "AND (boot_report_issued IS NULL OR boot_report_issued < ?)",
                (issued, appliance_id, issued),
            ).rowcount
        return bool(done == 1)

    def record_verified_boot(self, appliance_id: int, now: float) -> None:
        """An attested session opened: the PCRs match the baseline; remember when.

        A mismatch recorded before is over: the appliance booted its baseline state again
        (e.g. a changed kernel command line was restored). The refused values are dropped,
        so that no operator accepts as baseline a state the appliance no longer boots; the
        ``pcr_mismatch`` event and this ``pcr_restored`` one keep the history."""
        with self._tx() as db:
            restored = db.execute(
                "UPDATE attestations SET pending_pcr_values = NULL, pending_at = NULL "
                "WHERE appliance_id = ? AND pcr_state = ?",
                (appliance_id, PCR_MISMATCH),
            ).rowcount
            db.execute(
                "UPDATE attestations SET pcr_state = ?, last_verified = ? WHERE appliance_id = ?",
                (PCR_OK, now, appliance_id),
            )
            if restored == 1:
                _event(db, now, appliance_id, EVENT_PCR_RESTORED, "quote matches the baseline again")

    def accept_pcr_baseline(
        self, appliance_id: int, expected: tuple[str, ...], digest: bytes, now: float
    ) -> Attestation:
        """Operator decision: the pending PCR values (which must equal *expected*, i.e. what
        the operator was shown) become the baseline. Raises ValueError otherwise."""
        with self._tx() as db:
            row = db.execute(_SELECT + " WHERE appliance_id = ? FOR UPDATE", (appliance_id,)).fetchone()
            if row is None:
                raise ValueError("the appliance is not attested")
            rec = _record(row)
            if rec.pending_pcr_values is None or rec.pending_pcr_values != expected:
                raise ValueError("the pending PCR values changed since they were shown")
            db.execute(
                "UPDATE attestations SET pcr_values = ?, pcr_digest = ?, pcr_state = ?, pending_pcr_values = NULL, "
                "pending_at = NULL WHERE appliance_id = ?",
                (json.dumps(list(expected)), digest, PCR_OK, appliance_id),
            )
            _event(
                db, now, appliance_id, EVENT_BASELINE_CHANGED,
                f"old_digest={(rec.pcr_digest or b'').hex()} new_digest={digest.hex()}",
            )  # fmt: skip
        return rec

    def log_attestation_refused(self, appliance_id: int, reason: str, detail: str, now: float) -> None:
        """Audit a refused enrollment or session (never evidence bytes, only what was wrong)."""
        with self._tx() as db:
            _event(db, now, appliance_id, EVENT_REFUSED, f"reason={reason} {detail}"[:500])
