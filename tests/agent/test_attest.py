"""Attestation end to end on swtpm, without the network: agent.attest produces the evidence,
tools.platform.attestation verifies it (and refuses every forgery the issue names)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.attest import AttestationUnavailable, Attestor
from agent.keystore.tpm import TpmKeystore
from protocol import api
from tools.platform import attestation as at
from tools.swtpm import EkCa, Swtpm, copy_state, start_swtpm


@pytest.fixture(scope="module")
def ek_ca(tmp_path_factory: pytest.TempPathFactory) -> EkCa:
    return EkCa(tmp_path_factory.mktemp("ek-ca"))


@pytest.fixture
def tpm(tmp_path: Path, ek_ca: EkCa) -> Iterator[Swtpm]:
    t = start_swtpm(tmp_path / "tpm", ek_ca=ek_ca)
    yield t
    t.stop()


def new_keystore(root: Path, tcti: str, pcrs: tuple[int, ...] = ()) -> TpmKeystore:
    root.mkdir(mode=0o700)
    ks = TpmKeystore.create(root, tcti, pcrs)
    ks.persist()
    return ks


class Enrolled:
    """The platform's record of an enrolled appliance (what storage keeps)."""

    def __init__(self, ak: object, kek_name: bytes, counter: bytes, pcrs: tuple[int, ...], digest: bytes) -> None:
        self.ak, self.kek_name, self.counter, self.pcrs, self.digest = ak, kek_name, counter, pcrs, digest


TLS_SPKI = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
)
X_PUB = os.urandom(32)


def enroll(att: Attestor, ek_ca: EkCa) -> Enrolled:
    """Both halves of enrollment, as the platform's handler runs them."""
    e = att.enrollment()
    cas = at.load_ek_cas(ek_ca.bundle.read_bytes())
    cert = at.verify_ek_certificate(e.ek_certificate, cas, time.time())
    ak = at.parse_public(e.ak_public, "AK")
    challenge = at.make_challenge(at.ek_public(cert), at.check_ak(ak))
    secret = att.activate_credential(challenge.credential_blob, challenge.encrypted_secret)
    assert secret == challenge.secret
    binding = api.attestation_binding(secret, TLS_SPKI, X_PUB, b"")
    kek = at.parse_public(e.kek_public, "KEK")
    kek_name = at.check_sealed_key(kek)
    certify = att.certify_kek(binding)
    at.verify_certify(certify.attest, certify.signature, ak, kek_name, binding)
    pcrs = api.attested_pcrs(e.pcrs)
    quote, values = att.quote(binding)
    q = at.verify_quote(quote.attest, quote.signature, ak, binding, pcrs, values)
    assert q.values == tuple(values)
    return Enrolled(ak, kek_name, at.counter_name(e.counter_public), pcrs, q.digest)


def boot(att: Attestor, rec: Enrolled, nonce: bytes) -> tuple[int, bytes]:
    """One boot's evidence, verified: (certified counter, quote digest)."""
    att.keystore.next_boot()
    quote, values = att.quote(nonce)
    counter = att.certify_counter(nonce)
    q = at.verify_quote(quote.attest, quote.signature, rec.ak, nonce, rec.pcrs, values)
    return at.verify_counter(counter.attest, counter.signature, rec.ak, nonce, rec.counter), q.digest


def test_enrollment_and_boots_verify(tpm: Swtpm, ek_ca: EkCa, tmp_path: Path) -> None:
    ks = new_keystore(tmp_path / "state", tpm.tcti, (7,))
    try:
        att = Attestor(ks)
        rec = enroll(att, ek_ca)
        first, digest = boot(att, rec, os.urandom(32))
        second, digest2 = boot(att, rec, os.urandom(32))
        assert second == first + 1 and digest == digest2 == rec.digest
        assert at.counter_step(first, second) == at.STEP_OK
        tpm.extend_pcr(7)
        _, changed = boot(att, rec, os.urandom(32))
        assert changed != rec.digest  # the platform refuses this as pcr_mismatch
    finally:
        ks.close()


def test_forgeries_are_refused(tpm: Swtpm, ek_ca: EkCa, tmp_path: Path) -> None:
    ks = new_keystore(tmp_path / "state", tpm.tcti)
    try:
        att = Attestor(ks)
        rec = enroll(att, ek_ca)
        nonce = os.urandom(32)
        ks.next_boot()
        quote, values = att.quote(nonce)
        counter = att.certify_counter(nonce)
        # replayed: evidence over an old nonce
        with pytest.raises(at.AttestationError) as e:
            at.verify_quote(quote.attest, quote.signature, rec.ak, os.urandom(32), rec.pcrs, values)
        assert e.value.reason == api.REASON_NONCE_INVALID
        # forged counter: one byte of the certified value changed
        forged = bytearray(counter.attest)
        forged[-1] ^= 1
        with pytest.raises(at.AttestationError) as e:
            at.verify_counter(bytes(forged), counter.signature, rec.ak, nonce, rec.counter)
        assert e.value.reason == api.REASON_ATTESTATION_INVALID
        # a quote over other PCRs
        with pytest.raises(at.AttestationError) as e:
            at.verify_quote(quote.attest, quote.signature, rec.ak, nonce, (7,), values)
        assert "covers PCRs" in e.value.message
        # a quote passed off as a counter certification
        with pytest.raises(at.AttestationError):
            at.verify_counter(quote.attest, quote.signature, rec.ak, nonce, rec.counter)
    finally:
        ks.close()


def test_key_not_tpm_resident_is_refused(tpm: Swtpm, ek_ca: EkCa, tmp_path: Path) -> None:
    ks = new_keystore(tmp_path / "state", tpm.tcti)
    try:
        kek = at.parse_public(ks.kek_public(), "KEK")
        at.check_sealed_key(kek)
        kek.publicArea.objectAttributes &= ~at.RESIDENT
        with pytest.raises(at.AttestationError) as e:
            at.check_sealed_key(kek)
        assert e.value.reason == api.REASON_NOT_TPM_RESIDENT
    finally:
        ks.close()


def test_credential_for_another_tpm_does_not_activate(tmp_path: Path, ek_ca: EkCa) -> None:
    a = start_swtpm(tmp_path / "a", ek_ca=ek_ca)
    b = start_swtpm(tmp_path / "b", ek_ca=ek_ca)
    try:
        ka, kb = new_keystore(tmp_path / "sa", a.tcti), new_keystore(tmp_path / "sb", b.tcti)
        try:
            att_a, att_b = Attestor(ka), Attestor(kb)
            ea, eb = att_a.enrollment(), att_b.enrollment()
            cas = at.load_ek_cas(ek_ca.bundle.read_bytes())
            # A thief claims TPM b's EK certificate with TPM a's AK: b's credential cannot be opened on a.
            ek_b = at.ek_public(at.verify_ek_certificate(eb.ek_certificate, cas, time.time()))
            challenge = at.make_challenge(ek_b, at.check_ak(at.parse_public(ea.ak_public, "AK")))
            with pytest.raises(Exception, match="refuses the platform's credential"):
                att_a.activate_credential(challenge.credential_blob, challenge.encrypted_secret)
        finally:
            ka.close()
            kb.close()
    finally:
        a.stop()
        b.stop()


def test_untrusted_ek_ca_is_refused(tpm: Swtpm, tmp_path: Path) -> None:
    other = EkCa(tmp_path / "other-ca")
    t2 = start_swtpm(tmp_path / "t2", ek_ca=other)  # creates the other CA
    t2.stop()
    ks = new_keystore(tmp_path / "state", tpm.tcti)
    try:
        e = Attestor(ks).enrollment()
        with pytest.raises(at.AttestationError, match="not issued by a trusted EK CA"):
            at.verify_ek_certificate(e.ek_certificate, at.load_ek_cas(other.bundle.read_bytes()), time.time())
        with pytest.raises(ValueError, match="not a CA"):
            leaf = x509.load_der_x509_certificate(e.ek_certificate).public_bytes(serialization.Encoding.PEM)
            at.load_ek_cas(leaf)
    finally:
        ks.close()


def test_tpm_without_ek_certificate_cannot_attest(tmp_path: Path) -> None:
    bare = start_swtpm(tmp_path / "bare")
    try:
        ks = new_keystore(tmp_path / "state", bare.tcti)
        try:
            with pytest.raises(AttestationUnavailable):
                Attestor(ks).enrollment()
        finally:
            ks.close()
    finally:
        bare.stop()


def test_copied_software_tpm_is_a_copy(tpm: Swtpm, ek_ca: EkCa, tmp_path: Path) -> None:
    """What the platform can and cannot tell: a swtpm copy signs like the original, but its
    counter runs on its own, so the two are seen as a rollback once both boot."""
    ks = new_keystore(tmp_path / "state", tpm.tcti)
    try:
        att = Attestor(ks)
        rec = enroll(att, ek_ca)
        last, _ = boot(att, rec, os.urandom(32))
    finally:
        ks.close()
    tpm.stop()
    copy_state(tpm, tmp_path / "clone")
    tpm2 = start_swtpm(tpm.directory)
    clone = start_swtpm(tmp_path / "clone")
    try:
        real_ks = TpmKeystore.open(tmp_path / "state", ks.config(), tpm2.tcti)
        clone_ks = TpmKeystore.open(tmp_path / "state", ks.config(), clone.tcti)
        try:
            real, _ = boot(Attestor(real_ks), rec, os.urandom(32))
            copy, _ = boot(Attestor(clone_ks), rec, os.urandom(32))
            assert at.counter_step(last, real) == at.STEP_OK
            assert at.counter_step(real, copy) == at.STEP_ROLLBACK
        finally:
            real_ks.close()
            clone_ks.close()
    finally:
        tpm2.stop()
        clone.stop()


@pytest.mark.parametrize(("last", "new", "step"), [(None, 5, "ok"), (5, 6, "ok"), (5, 5, "rollback"),
                                                   (5, 4, "rollback"), (5, 5 + api.MAX_BOOT_COUNTER_STEP + 1, "jump")])
def test_counter_step(last: int | None, new: int, step: str) -> None:
    assert at.counter_step(last, new) == step
