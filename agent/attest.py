"""Remote attestation, the appliance's half: TPM evidence for the platform to verify.

The platform (`tools.platform.attestation`) checks what is produced here; the flow is the one
Keylime and go-attestation use:

Enrollment (once, right after activation, or after a migration into the TPM):

1. ``enrollment()``: the EK certificate from the TPM's NV (index 0x01c00002, the TCG EK
   Credential Profile's RSA-2048 EK; written by the TPM vendor, by swtpm_setup in tests),
   a new attestation key (AK: restricted ECDSA P-256 signing key, FIXEDTPM|FIXEDPARENT,
   generated inside the TPM under the storage primary key; its wrapped private part lives
   in ``tpm-ak.priv``, useless on any other TPM), the public area of the sealed KEK
   object and of the NV boot counter, and the PCRs the keystore is bound to.
2. The platform answers with MakeCredential(EK public, secret, AK name).
   ``activate_credential()`` recovers the secret: the TPM releases it only when the
   object named in the credential (our AK) is loaded in the same TPM as that EK.
3. ``certify_kek(binding)``: TPM2_Certify of the sealed KEK object by the AK, with the
   platform's binding (secret + TLS and sealing public keys) as qualifying data, and a
   baseline ``quote(binding)``.

Every boot: ``quote(nonce)`` over the bound PCRs and ``certify_counter(nonce)`` (TPM2_NV_Certify
of the boot counter, after ``next_boot()`` advanced it), both over a nonce the platform
handed out for this boot only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from tpm2_pytss import TSS2_Exception
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_SE, TPMA_OBJECT
from tpm2_pytss.types import (
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPML_PCR_SELECTION,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF,
)
from tpm2_pytss.utils import NoSuchIndex, NVReadEK, create_ek_template

from agent.errors import KeystoreError, StateError
from agent.keystore.base import read_into, write_new
from agent.keystore.tpm import TpmKeystore
from protocol import api

log = logging.getLogger("agent.attest")

AK_PUB: Final = "tpm-ak.pub"
AK_PRIV: Final = "tpm-ak.priv"
EK_TYPE: Final = "EK-RSA2048"  # the TCG EK Credential Profile's low-range RSA EK (NV 0x01c00002)
_MAX_EK_CERT: Final = 4096  # bytes; EK certificates are ~1 KiB


class AttestationUnavailable(KeystoreError):
    """This TPM cannot attest (no EK certificate): the appliance stays unattested (``claimed``)."""


@dataclass(frozen=True)
class Enrollment:
    """What the appliance tells the platform to enroll (all TPM structures marshalled)."""

    ek_certificate: bytes  # DER
    ak_public: bytes  # TPM2B_PUBLIC
    kek_public: bytes  # TPM2B_PUBLIC of the sealed KEK object
    counter_public: bytes  # TPM2B_NV_PUBLIC of the boot counter index
    pcrs: tuple[int, ...]
    counter_base: int


@dataclass(frozen=True)
class Evidence:
    """One signed TPM statement: TPM2B_ATTEST and TPMT_SIGNATURE, marshalled."""

    attest: bytes
    signature: bytes


def _ak_template() -> Any:
    # Restricted signing key: the TPM signs with it only structures it produced itself
    # (quotes, certifications), never an outside digest that could imitate one.
    attrs = (
        TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
        | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.NODA
    )  # fmt: skip
    return TPM2B_PUBLIC.parse("ecc256:ecdsa-sha256:null", objectAttributes=attrs)


def _scheme() -> Any:
    return TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)  # the AK's own scheme (ECDSA-SHA256)


def _tpm_error(what: str, e: TSS2_Exception) -> KeystoreError:
    return KeystoreError(f"{what} ({e})", "check the TPM and retry")


class Attestor:
    """Attestation operations on the TPM of a tpm keystore (which stays open and owned by its caller)."""

    def __init__(self, keystore: TpmKeystore) -> None:
        self.keystore = keystore
        self.root: Path = keystore.root

    def __repr__(self) -> str:
        return f"<Attestor root={str(self.root)!r} tcti={self.keystore.tcti!r}>"

    @property
    def enrolled(self) -> bool:
        """Whether an AK exists in this state dir (created by enrollment())."""
        return (self.root / AK_PUB).exists() and (self.root / AK_PRIV).exists()

    # -- enrollment --

    def ek_certificate(self) -> bytes:
        """The EK certificate (DER) from the TPM's NV; AttestationUnavailable if there is none."""
        esapi = self.keystore.esapi
        try:
            cert, _ = create_ek_template(EK_TYPE, NVReadEK(esapi))
        except (NoSuchIndex, ValueError):
            cert = None
        except TSS2_Exception as e:
            raise _tpm_error("cannot read the TPM's EK certificate", e) from None
        if not cert:
            raise AttestationUnavailable(
                "this TPM has no EK certificate (NV 0x01c00002), so the platform cannot verify it",
                "the appliance runs unattested; provision the TPM's EK certificate to attest it",
            )
        if len(cert) > _MAX_EK_CERT:
            raise AttestationUnavailable(f"the TPM's EK certificate is over {_MAX_EK_CERT} bytes")
        return bytes(cert)

    def enrollment(self) -> Enrollment:
        """Create the AK (once) and collect what the platform needs to enroll this TPM."""
        ek_cert = self.ek_certificate()
        if not self.enrolled:
            self._create_ak()
        esapi = self.keystore.esapi
        try:
            handle = esapi.tr_from_tpmpublic(self.keystore.nv_index)
            try:
                nv_public, _ = esapi.nv_read_public(handle)
            finally:
                esapi.tr_close(handle)
        except TSS2_Exception as e:
            raise _tpm_error(f"cannot read the boot counter's NV index {self.keystore.nv_index:#x}", e) from None
        return Enrollment(
            ek_certificate=ek_cert,
            ak_public=bytes(self._ak_files()[0].marshal()),
            kek_public=self.keystore.kek_public(),
            counter_public=bytes(nv_public.marshal()),
            pcrs=self.keystore.pcrs,
            counter_base=self.keystore.counter_base,
        )

    def _create_ak(self) -> None:
        esapi = self.keystore.esapi
        primary = self.keystore.storage_primary()
        try:
            priv, pub, *_ = esapi.create(primary, TPM2B_SENSITIVE_CREATE(), _ak_template())
        except TSS2_Exception as e:
            raise _tpm_error("the TPM refused to create the attestation key", e) from None
        finally:
            esapi.flush_context(primary)
        for name in (AK_PUB, AK_PRIV):
            (self.root / name).unlink(missing_ok=True)  # a half-written pair from a crash
        write_new(self.root / AK_PUB, bytes(pub.marshal()))
        write_new(self.root / AK_PRIV, bytes(priv.marshal()))
        log.info("event=attestation_key_created")

    def _ak_files(self) -> tuple[Any, Any]:
        try:
            pub, _ = TPM2B_PUBLIC.unmarshal(bytes(read_into(self.root / AK_PUB)))
            priv, _ = TPM2B_PRIVATE.unmarshal(bytes(read_into(self.root / AK_PRIV)))
        except FileNotFoundError as e:
            raise StateError(f"{e.filename} is missing", "run 'scanner-agent attest' to enroll the TPM again") from None
        except (TSS2_Exception, ValueError, IndexError):
            raise StateError(f"{AK_PUB}/{AK_PRIV} do not parse as a TPM object", "re-activate the appliance") from None
        return pub, priv

    def _with_ak(self, fn: Any) -> Any:
        """Run fn(esapi, primary, ak) with the AK loaded; every handle is flushed after."""
        esapi = self.keystore.esapi
        pub, priv = self._ak_files()
        primary = self.keystore.storage_primary()
        try:
            try:
                ak = esapi.load(primary, priv, pub)
            except TSS2_Exception as e:
                raise KeystoreError(
                    f"the TPM does not accept the appliance's attestation key ({e}): another TPM or a cleared one",
                    "re-activate the appliance",
                ) from None
            try:
                return fn(esapi, primary, ak)
            finally:
                esapi.flush_context(ak)
        finally:
            esapi.flush_context(primary)

    def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        """TPM2_ActivateCredential with the EK: the platform's secret, if the credential names our AK."""
        try:
            blob, _ = TPM2B_ID_OBJECT.unmarshal(credential_blob)
            secret, _ = TPM2B_ENCRYPTED_SECRET.unmarshal(encrypted_secret)
        except (TSS2_Exception, ValueError, IndexError):
            raise KeystoreError("the platform's credential challenge does not parse", "retry the enrollment") from None

        def activate(esapi: Any, _primary: Any, ak: Any) -> bytes:
            _, template = create_ek_template(EK_TYPE, NVReadEK(esapi))
            ek, *_ = esapi.create_primary(TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.ENDORSEMENT)
            try:
                # The EK's only authorisation is PolicySecret(endorsement hierarchy).
                session = esapi.start_auth_session(
                    ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY, TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), TPM2_ALG.SHA256
                )
                try:
                    esapi.policy_secret(ESYS_TR.ENDORSEMENT, session, b"", b"", b"", 0)
                    cred = esapi.activate_credential(ak, ek, blob, secret, session1=ESYS_TR.PASSWORD, session2=session)
                finally:
                    esapi.flush_context(session)
            finally:
                esapi.flush_context(ek)
            return bytes(cred)

        try:
            result: bytes = self._with_ak(activate)
        except TSS2_Exception as e:
            raise KeystoreError(
                f"the TPM refuses the platform's credential ({e}): it was not made for this TPM's EK and AK",
                "retry the enrollment; if it keeps failing the platform holds another TPM's EK for this appliance",
            ) from None
        return result

    def certify_kek(self, qualifying: bytes) -> Evidence:
        """TPM2_Certify of the sealed KEK object by the AK over *qualifying*."""

        def certify(esapi: Any, primary: Any, ak: Any) -> Evidence:
            kek = self.keystore.load_kek(primary)
            try:
                attest, sig = esapi.certify(kek, ak, qualifying, _scheme(), session1=ESYS_TR.PASSWORD,
                                            session2=ESYS_TR.PASSWORD)  # fmt: skip
            finally:
                esapi.flush_context(kek)
            return Evidence(bytes(attest.marshal()), bytes(sig.marshal()))

        evidence: Evidence = self._signed("certify the sealed key", certify)
        return evidence

    # -- every boot --

    def quote(self, nonce: bytes) -> tuple[Evidence, list[bytes]]:
        """TPM2_Quote over the keystore's bound PCRs (SHA-256 bank) and their current values."""
        pcrs = api.attested_pcrs(self.keystore.pcrs)
        selection = TPML_PCR_SELECTION.parse("sha256:" + ",".join(str(p) for p in pcrs))

        def quote(esapi: Any, _primary: Any, ak: Any) -> tuple[Evidence, list[bytes]]:
            attest, sig = esapi.quote(ak, selection, nonce, _scheme())
            values: list[bytes] = []
            for pcr in pcrs:  # one at a time: pcr_read returns at most 8 per call
                _, _, digests = esapi.pcr_read(TPML_PCR_SELECTION.parse(f"sha256:{pcr}"))
                values.append(bytes(digests[0]))
            return Evidence(bytes(attest.marshal()), bytes(sig.marshal())), values

        result: tuple[Evidence, list[bytes]] = self._signed("quote the PCRs", quote)
        return result

    def certify_counter(self, nonce: bytes) -> Evidence:
        """TPM2_NV_Certify of the boot counter (8 bytes at offset 0) by the AK over *nonce*."""

        def certify(esapi: Any, _primary: Any, ak: Any) -> Evidence:
            nv = esapi.tr_from_tpmpublic(self.keystore.nv_index)
            try:
                attest, sig = esapi.nv_certify(ak, nv, nonce, _scheme(), 8, 0, auth_handle=nv,
                                               session1=ESYS_TR.PASSWORD, session2=ESYS_TR.PASSWORD)  # fmt: skip
            finally:
                esapi.tr_close(nv)
            return Evidence(bytes(attest.marshal()), bytes(sig.marshal()))

        evidence: Evidence = self._signed("certify the boot counter", certify)
        return evidence

    def _signed(self, what: str, fn: Any) -> Any:
        try:
            return self._with_ak(fn)
        except TSS2_Exception as e:
            raise _tpm_error(f"the TPM refused to {what}", e) from None
