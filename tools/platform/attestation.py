"""Remote attestation, the platform's half: verify TPM evidence. Pure (no I/O, no database).

The appliance's half is `agent.attest`; docs/platform.md "Attestation" explains the flow and
what each check proves. TPM structures are unmarshalled with tpm2-pytss's types, signatures
and certificates checked with `cryptography` (through tpm2-pytss where it wraps it):

- `verify_ek_certificate`: the EK certificate chains to an operator-trusted manufacturer CA.
- `make_challenge`: MakeCredential(EK public from that certificate, fresh secret, AK name).
  Only the TPM that holds the EK can recover the secret, and only for an object with exactly
  that name (our AK, whose attributes say FIXEDTPM, restricted signing) loaded beside it.
- `verify_certify`: TPM2_Certify of the sealed KEK object by the AK: the KEK object is in
  that TPM and is FIXEDTPM|FIXEDPARENT (cannot be duplicated out of it).
- `verify_quote` / `verify_counter`: every boot, PCRs and the NV boot counter signed by the
  AK over a nonce the platform issued for that boot.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from tpm2_pytss import TSS2_Exception
from tpm2_pytss.constants import TPM2_ALG, TPM2_ECC, TPM2_GENERATED, TPM2_NT, TPM2_ST, TPMA_NV, TPMA_OBJECT
from tpm2_pytss.types import (
    TPM2B_ATTEST,
    TPM2B_NV_PUBLIC,
    TPM2B_PUBLIC,
    TPMS_ATTEST,
    TPMT_SIGNATURE,
)
from tpm2_pytss.utils import ek_template, make_credential

from protocol import api

EK_TYPE: Final = "EK-RSA2048"
EK_ECC_TYPE: Final = "EK-ECC256"
SECRET_BYTES: Final = 32
# What makes a key "TPM-resident and non-exportable": it cannot be duplicated to another TPM
# (FIXEDTPM) nor re-parented (FIXEDPARENT).
RESIDENT: Final = TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
_AK_REQUIRED: Final = RESIDENT | TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.SENSITIVEDATAORIGIN


class AttestationError(Exception):
    """Evidence refused; ``reason`` is the wire reason (api.REASON_*), the message says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def _invalid(message: str) -> AttestationError:
    return AttestationError(api.REASON_ATTESTATION_INVALID, message)


# --- trusted EK CAs (operator configuration) ----------------------------------------------


def load_ek_cas(pem: bytes) -> list[x509.Certificate]:
    """The CA certificates of a PEM bundle (manufacturer roots and issuing CAs); ValueError."""
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise ValueError("is not a PEM bundle of X.509 certificates") from None
    for cert in certs:
        try:
            ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            ca = False
        if not ca:
            raise ValueError(f"holds a certificate that is not a CA ({cert.subject.rfc4514_string()})")
    return certs


def _valid_at(cert: x509.Certificate, now: float) -> bool:
    when = dt.datetime.fromtimestamp(now, dt.UTC)
    return cert.not_valid_before_utc <= when <= cert.not_valid_after_utc


def verify_ek_certificate(der: bytes, cas: Sequence[x509.Certificate], now: float) -> x509.Certificate:
    """The EK certificate, if one of the trusted CAs issued it and both are valid now.

    Every certificate the operator configured is a trust anchor (a manufacturer's issuing
    CA as well as its root): the EK certificate must be directly issued by one of them.
    EK certificates have an empty or meaningless subject and a critical TPM SAN, so the
    RFC 5280 web-PKI verifier does not apply; the signature is checked directly.
    """
    if len(der) > api.MAX_EK_CERTIFICATE:
        raise _invalid("the EK certificate is too large")
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        raise _invalid("the EK certificate is not DER X.509") from None
    if not _valid_at(cert, now):
        raise _invalid("the EK certificate is expired or not yet valid")
    for ca in cas:
        if ca.subject != cert.issuer or not _valid_at(ca, now):
            continue
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return cert
    raise _invalid(f"the EK certificate (issuer {cert.issuer.rfc4514_string()}) is not issued by a trusted EK CA")


def ek_public(cert: x509.Certificate) -> Any:
    """The EK's TPM2B_PUBLIC: the TCG EK Credential Profile template with the certified key."""
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey) and key.key_size == 2048:
        template = ek_template.lookup(EK_TYPE).template
        public = TPM2B_PUBLIC(publicArea=template.publicArea)
        public.publicArea.unique.rsa = key.public_numbers().n.to_bytes(256, "big")
        return public
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        template = ek_template.lookup(EK_ECC_TYPE).template
        public = TPM2B_PUBLIC(publicArea=template.publicArea)
        numbers = key.public_numbers()
        public.publicArea.unique.ecc.x = numbers.x.to_bytes(32, "big")
        public.publicArea.unique.ecc.y = numbers.y.to_bytes(32, "big")
        return public
    raise _invalid("the EK certificate's key is neither RSA-2048 nor ECC P-256")


# --- public areas -------------------------------------------------------------------------


def _unmarshal(kind: Any, data: bytes, what: str) -> Any:
    if not data or len(data) > api.MAX_EVIDENCE:
        raise _invalid(f"{what} is empty or too large")
    try:
        value, used = kind.unmarshal(data)
    except (TSS2_Exception, ValueError, IndexError, TypeError):
        raise _invalid(f"{what} does not parse") from None
    if used != len(data):
        raise _invalid(f"{what} has trailing bytes")
    return value


def parse_public(data: bytes, what: str) -> Any:
    """A marshalled TPM2B_PUBLIC."""
    return _unmarshal(TPM2B_PUBLIC, data, what)


def object_name(public: Any) -> bytes:
    """The TPM name (nameAlg || H(public area)) of an object."""
    return bytes(public.get_name().marshal())[2:]  # drop the TPM2B size: compare names themselves


def check_ak(public: Any) -> bytes:
    """The AK's name, if its public area is a restricted, TPM-fixed ECDSA-P256/SHA-256 signing key."""
    area = public.publicArea
    attrs = area.objectAttributes
    if (attrs & _AK_REQUIRED) != _AK_REQUIRED or attrs & TPMA_OBJECT.DECRYPT:
        raise _invalid("the AK is not a restricted, TPM-generated, FIXEDTPM|FIXEDPARENT signing key")
    if (
        area.type != TPM2_ALG.ECC
        or area.nameAlg != TPM2_ALG.SHA256
        or area.parameters.eccDetail.curveID != TPM2_ECC.NIST_P256
        or area.parameters.eccDetail.scheme.scheme != TPM2_ALG.ECDSA
        or area.parameters.eccDetail.scheme.details.ecdsa.hashAlg != TPM2_ALG.SHA256
    ):
        raise _invalid("the AK is not an ECDSA P-256 / SHA-256 key")
    return object_name(public)


def check_sealed_key(public: Any) -> bytes:
    """The name of the sealed KEK object, if it is TPM-resident sealed data (FIXEDTPM|FIXEDPARENT)."""
    area = public.publicArea
    if area.type != TPM2_ALG.KEYEDHASH or area.nameAlg != TPM2_ALG.SHA256:
        raise AttestationError(api.REASON_NOT_TPM_RESIDENT, "the certified key is not a TPM sealed-data object")
    if (area.objectAttributes & RESIDENT) != RESIDENT:
        raise AttestationError(
            api.REASON_NOT_TPM_RESIDENT,
            "the certified key is not FIXEDTPM|FIXEDPARENT: the TPM would let it be duplicated elsewhere",
        )
    return object_name(public)


def counter_name(data: bytes) -> bytes:
    """The name the boot counter has once written, if *data* is an 8-byte NV counter index."""
    nv = _unmarshal(TPM2B_NV_PUBLIC, data, "the counter's NV public area").nvPublic
    kind = (nv.attributes & TPMA_NV.TPM2_NT_MASK) >> TPMA_NV.TPM2_NT_SHIFT
    if kind != TPM2_NT.COUNTER or nv.dataSize != 8 or nv.nameAlg != TPM2_ALG.SHA256:
        raise _invalid("the boot counter is not a TPM NV counter (TPM_NT_COUNTER, 8 bytes)")
    nv.attributes |= TPMA_NV.WRITTEN  # its name once the first increment initialised it
    return bytes(nv.get_name().marshal())[2:]


# --- credential activation ----------------------------------------------------------------


@dataclass(frozen=True)
class Challenge:
    """MakeCredential's output and the secret it hides (kept by the platform, never sent)."""

    secret: bytes
    credential_blob: bytes  # TPM2B_ID_OBJECT
    encrypted_secret: bytes  # TPM2B_ENCRYPTED_SECRET


def make_challenge(ek: Any, ak_name: bytes) -> Challenge:
    """MakeCredential for the TPM holding *ek*, releasable only to the object named *ak_name*."""
    secret = secrets.token_bytes(SECRET_BYTES)
    blob, encrypted = make_credential(ek, secret, ak_name)
    return Challenge(secret, bytes(blob.marshal()), bytes(encrypted.marshal()))


# --- signed evidence ----------------------------------------------------------------------


def verify_evidence(attest: bytes, signature: bytes, ak: Any, kind: Any, qualifying: bytes) -> Any:
    """The TPMS_ATTEST of *attest*, if the AK signed it, the TPM made it, it is of *kind*
    and carries *qualifying* (a nonce or the enrollment binding) as its extraData."""
    outer = _unmarshal(TPM2B_ATTEST, attest, "the attestation structure")
    sig = _unmarshal(TPMT_SIGNATURE, signature, "the signature")
    signed = bytes(outer.attestationData)  # the marshalled TPMS_ATTEST, exactly as signed
    if sig.sigAlg != TPM2_ALG.ECDSA or sig.signature.ecdsa.hash != TPM2_ALG.SHA256:
        raise _invalid("the signature is not ECDSA / SHA-256")
    try:
        sig.verify_signature(ak, signed)
    except (InvalidSignature, ValueError, TypeError):
        raise _invalid("the signature does not verify under the appliance's attestation key") from None
    body = _unmarshal(TPMS_ATTEST, signed, "the attested structure")
    if body.magic != TPM2_GENERATED.VALUE:
        raise _invalid("the attested structure was not generated by a TPM")
    if body.type != kind:
        raise _invalid("the attested structure is of the wrong kind")
    if not hmac.compare_digest(bytes(body.extraData), qualifying):
        raise AttestationError(
            api.REASON_NONCE_INVALID, "the evidence is not over this platform challenge (replayed or stale)"
        )
    return body


def qualifying_data(attest: bytes) -> bytes:
    """The extraData of an attestation structure, NOT verified: only to look up which
    challenge it claims to answer (verify_evidence then checks it against that)."""
    outer = _unmarshal(TPM2B_ATTEST, attest, "the attestation structure")
    body = _unmarshal(TPMS_ATTEST, bytes(outer.attestationData), "the attested structure")
    return bytes(body.extraData)


def verify_certify(attest: bytes, signature: bytes, ak: Any, kek_name: bytes, binding: bytes) -> None:
    """TPM2_Certify by the AK of the object named *kek_name*, over *binding*."""
    body: TPMS_ATTEST = verify_evidence(attest, signature, ak, TPM2_ST.ATTEST_CERTIFY, binding)
    certified = bytes(body.attested.certify.name)
    if not hmac.compare_digest(certified, kek_name):
        raise AttestationError(
            api.REASON_NOT_TPM_RESIDENT, "the certification names another object than the appliance's sealed key"
        )


def selected_pcrs(selection: Any) -> tuple[int, ...]:
    """The SHA-256 PCR indices of a TPML_PCR_SELECTION; other banks make it invalid."""
    pcrs: list[int] = []
    for bank in selection:
        bits = bytes(bank.pcrSelect)[: bank.sizeofSelect]
        chosen = [i for i in range(len(bits) * 8) if bits[i // 8] & (1 << (i % 8))]
        if bank.hash != TPM2_ALG.SHA256 and chosen:
            raise _invalid("the quote covers a PCR bank other than SHA-256")
        pcrs.extend(chosen)
    return tuple(sorted(pcrs))


def pcr_digest(values: Sequence[bytes]) -> bytes:
    """TPM2_Quote's pcrDigest: SHA-256 over the selected PCR values in selection order."""
    return hashlib.sha256(b"".join(values)).digest()


@dataclass(frozen=True)
class Quote:
    """A verified quote: its digest and, when the appliance's PCR values hash to it, those."""

    digest: bytes
    values: tuple[bytes, ...] | None


def verify_quote(
    attest: bytes, signature: bytes, ak: Any, nonce: bytes, pcrs: tuple[int, ...], values: Sequence[bytes] | None
) -> Quote:
    """TPM2_Quote by the AK over *nonce* and exactly the PCRs *pcrs* (SHA-256 bank)."""
    body = verify_evidence(attest, signature, ak, TPM2_ST.ATTEST_QUOTE, nonce)
    quoted = selected_pcrs(body.attested.quote.pcrSelect)
    if quoted != tuple(sorted(pcrs)):
        raise _invalid(f"the quote covers PCRs {list(quoted)}, not the recorded {list(pcrs)}")
    digest = bytes(body.attested.quote.pcrDigest)
    shown: tuple[bytes, ...] | None = None
    if values is not None and len(values) == len(pcrs) and hmac.compare_digest(pcr_digest(values), digest):
        shown = tuple(values)
    return Quote(digest, shown)


def verify_counter(attest: bytes, signature: bytes, ak: Any, nonce: bytes, name: bytes) -> int:
    """The boot counter value from a TPM2_NV_Certify by the AK over *nonce* of the index *name*."""
    body = verify_evidence(attest, signature, ak, TPM2_ST.ATTEST_NV, nonce)
    nv = body.attested.nv
    if not hmac.compare_digest(bytes(nv.indexName), name):
        raise _invalid("the certified NV index is not the appliance's boot counter")
    contents = bytes(nv.nvContents)
    if nv.offset != 0 or len(contents) != 8:
        raise _invalid("the certified NV range is not the whole 8-byte counter")
    return int.from_bytes(contents, "big")


# --- boot counter policy ------------------------------------------------------------------

STEP_OK: Final = "ok"
STEP_ROLLBACK: Final = "rollback"  # not above the last accepted boot: a second copy booting
STEP_JUMP: Final = "jump"  # far above it: a forged counter or a copy advanced on its own


def counter_step(last: int | None, new: int) -> str:
    """How a new boot counter relates to the last accepted one."""
    if last is None:
        return STEP_OK
    if new <= last:
        return STEP_ROLLBACK
    if new - last > api.MAX_BOOT_COUNTER_STEP:
        return STEP_JUMP
    return STEP_OK
