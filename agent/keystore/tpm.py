"""The ``tpm`` keystore: secrets sealed under a TPM-held wrapping key (tpm2-pytss, ESAPI).

Design (why an envelope and not TPM-resident keys):

- Secrets come in any size: an X25519 key is 32 bytes, a P-256 PKCS#8 PEM ~240, and a
  hybrid ML-KEM-768+X25519 private key is larger than the 128 bytes a TPM sealed-data
  object holds; and the TPM cannot compute X25519 or ML-KEM at all, so the sealing keys
  have to be unwrapped into process memory whatever we do. One TPM-sealed 256-bit
  wrapping key (KEK) plus an AES-256-GCM envelope per secret covers every size and every
  algorithm with one mechanism, one PCR policy and one unseal per boot.
- The TLS key could stay inside the TPM through the tpm2-openssl provider, but Python's
  ``ssl`` module cannot load a provider key (it has no OSSL_STORE/provider API), so it
  would mean moving the agent's TLS stack off the standard library. Instead the TLS key
  is unwrapped into locked memory (the agent runs under mlockall, non-dumpable, no core)
  and handed to OpenSSL through a memfd, never a file.

On disk (all 0600): ``tpm-kek.pub`` / ``tpm-kek.priv`` (the sealed KEK as TPM2B_PUBLIC /
TPM2B_PRIVATE; the private part is encrypted by the TPM's storage primary key, derived
from the owner seed that never leaves that TPM) and ``NAME.tpm`` per secret:
``"SKS1" | nonce(12) | AES-256-GCM(KEK, secret, aad = label | name)``. The sealed object
is FIXEDTPM|FIXEDPARENT|NODA; without PCRs it needs an empty auth value (any process with
TPM access on *this* machine may unseal; the point is that no other machine can), with
PCRs its only auth is PolicyPCR over the values at activation.

Every unseal runs in a session salted with the primary key and with response-parameter
encryption, so the KEK does not cross the bus to a discrete TPM in clear.

The boot counter is an NV counter index (TPM2_NT_COUNTER): monotonic by TPM
construction, it survives re-imaging of the disk and cannot be rolled back by restoring
a disk image.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any, ClassVar, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from tpm2_pytss import ESAPI, TCTILdr, TSS2_Exception
from tpm2_pytss.constants import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_NT,
    TPM2_RC,
    TPM2_SE,
    TPMA_NV,
    TPMA_OBJECT,
    TPMA_SESSION,
)
from tpm2_pytss.types import (
    TPM2B_DIGEST,
    TPM2B_NV_PUBLIC,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPM2B_SENSITIVE_DATA,
    TPML_PCR_SELECTION,
    TPMS_NV_PUBLIC,
    TPMS_SENSITIVE_CREATE,
    TPMT_PUBLIC,
    TPMT_SYM_DEF,
    TPMU_SYM_KEY_BITS,
    TPMU_SYM_MODE,
)

from agent.errors import KeystoreError, PcrMismatchError, StateError
from agent.keystore.base import Keystore, check_name, read_into, store_atomically, write_new
from scratchfs.keyholder.wipe import wipe

KEK_PUB: Final = "tpm-kek.pub"
KEK_PRIV: Final = "tpm-kek.priv"
SUFFIX: Final = ".tpm"
_MAGIC: Final = b"SKS1"
_NONCE: Final = 12
_AAD: Final = b"scanner-agent/keystore/v1\x00"
# Owner-range NV indices (TCG handle registry: 0x01000000-0x013FFFFF "owner"); random within
# a block of 64 Ki so that two activations on one TPM (re-activation) do not collide.
_NV_BASE: Final = 0x01500000
_NV_SPAN: Final = 0x10000
_MAX_PCR: Final = 23
_REACTIVATE: Final = "re-activate the appliance ('scanner-agent activate' into a new state dir)"


def parse_tcti(tcti: str) -> tuple[str, str | None]:
    """``NAME[:CONF]`` as in tpm2-tools (``device:/dev/tpmrm0``, ``swtpm:path=/run/sock``)."""
    name, sep, conf = tcti.partition(":")
    if not name or not name.replace("-", "").isalnum():
        raise KeystoreError(f"invalid TCTI {tcti!r}", "use e.g. device:/dev/tpmrm0 or swtpm:path=SOCKET")
    return name, (conf if sep else None)


def parse_pcrs(text: str) -> tuple[int, ...]:
    """``"7"`` or ``"0,2,7"`` -> sorted unique PCR indices (SHA-256 bank)."""
    try:
        pcrs = sorted({int(p) for p in text.split(",") if p.strip()})
    except ValueError:
        raise KeystoreError(f"invalid PCR list {text!r}", "give PCR numbers like 7 or 0,2,7") from None
    if not pcrs or pcrs[0] < 0 or pcrs[-1] > _MAX_PCR:
        raise KeystoreError(f"invalid PCR list {text!r}", f"give PCR numbers between 0 and {_MAX_PCR}")
    return tuple(pcrs)


def _tpm_error(what: str, e: TSS2_Exception, hint: str) -> KeystoreError:
    return KeystoreError(f"{what} ({e})", hint)


def _connect(tcti: str) -> ESAPI:
    name, conf = parse_tcti(tcti)
    try:
        return ESAPI(TCTILdr(name, conf))
    except TSS2_Exception as e:
        raise _tpm_error(
            f"cannot reach the TPM through TCTI {tcti!r}", e, "check the TPM device (or --tcti) and retry"
        ) from None


def _selection(pcrs: tuple[int, ...]) -> Any:
    return TPML_PCR_SELECTION.parse("sha256:" + ",".join(str(p) for p in pcrs))


def _aes_cfb() -> Any:
    return TPMT_SYM_DEF(
        algorithm=TPM2_ALG.AES, keyBits=TPMU_SYM_KEY_BITS(aes=128), mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB)
    )


class TpmKeystore(Keystore):
    """Secrets as AES-GCM envelopes under a TPM-sealed KEK; boot counter in TPM NV."""

    kind: ClassVar[str] = "tpm"

    def __init__(
        self,
        root: Path,
        tcti: str,
        pcrs: tuple[int, ...],
        nv_index: int,
        esapi: ESAPI,
        sealed: tuple[bytes, bytes] | None = None,
        kek: bytearray | None = None,
        counter_base: int = 0,
    ) -> None:
        super().__init__(root)
        self.tcti = tcti
        self.pcrs = pcrs
        self.nv_index = nv_index
        # Added to the NV counter: an appliance migrated from the file keystore has already
        # told the platform about boots up to this number, and counters must only grow.
        self.counter_base = counter_base
        self._esapi = esapi
        self._sealed = sealed  # (public, private) marshalled, only between create and persist
        self._kek = kek

    def __repr__(self) -> str:
        return f"<TpmKeystore root={str(self.root)!r} tcti={self.tcti!r} pcrs={list(self.pcrs)}>"

    # -- creation (activation) --

    @classmethod
    def create(cls, root: Path, tcti: str, pcrs: tuple[int, ...]) -> TpmKeystore:
        """Seal a fresh KEK in the TPM and define the NV boot counter."""
        esapi = _connect(tcti)
        kek = bytearray(os.urandom(32))
        try:
            primary = cls._primary(esapi)
            try:
                policy = cls._pcr_policy(esapi, pcrs) if pcrs else None
                attrs = TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.NODA
                if policy is None:
                    attrs |= TPMA_OBJECT.USERWITHAUTH
                template = TPMT_PUBLIC(
                    type=TPM2_ALG.KEYEDHASH,
                    nameAlg=TPM2_ALG.SHA256,
                    objectAttributes=attrs,
                    authPolicy=policy if policy is not None else TPM2B_DIGEST(),
                )
                template.parameters.keyedHashDetail.scheme.scheme = TPM2_ALG.NULL
                sensitive = TPM2B_SENSITIVE_CREATE(TPMS_SENSITIVE_CREATE(data=TPM2B_SENSITIVE_DATA(bytes(kek))))
                priv, pub, *_ = esapi.create(primary, sensitive, TPM2B_PUBLIC(template))
            finally:
                esapi.flush_context(primary)
            nv_index = cls._define_counter(esapi)
        except TSS2_Exception as e:
            wipe(kek)
            esapi.close()
            raise _tpm_error("the TPM refused to create the appliance's keys", e, "check the TPM and retry") from None
        except BaseException:
            wipe(kek)
            esapi.close()
            raise
        return cls(root, tcti, pcrs, nv_index, esapi, (bytes(pub.marshal()), bytes(priv.marshal())), kek)

    @staticmethod
    def _primary(esapi: ESAPI) -> Any:
        # The standard ECC storage primary (tpm2-tools' default): derived from the owner
        # seed, so it is the same key at every boot and exists on no other TPM.
        template = TPM2B_PUBLIC.parse(
            "ecc256:aes128cfb", objectAttributes=TPMA_OBJECT.DEFAULT_TPM2_TOOLS_CREATEPRIMARY_ATTRS
        )
        handle, *_ = esapi.create_primary(TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.OWNER)
        return handle

    @staticmethod
    def _pcr_policy(esapi: ESAPI, pcrs: tuple[int, ...]) -> Any:
        trial = esapi.start_auth_session(
            ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.TRIAL, TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), TPM2_ALG.SHA256
        )
        try:
            esapi.policy_pcr(trial, TPM2B_DIGEST(), _selection(pcrs))  # empty digest: current values
            return esapi.policy_get_digest(trial)
        finally:
            esapi.flush_context(trial)

    @staticmethod
    def _define_counter(esapi: ESAPI) -> int:
        attrs = TPMA_NV.AUTHREAD | TPMA_NV.AUTHWRITE | TPMA_NV.NO_DA | (TPM2_NT.COUNTER << TPMA_NV.TPM2_NT_SHIFT)
        for _ in range(16):
            index = _NV_BASE + secrets.randbelow(_NV_SPAN)
            public = TPM2B_NV_PUBLIC(
                TPMS_NV_PUBLIC(nvIndex=index, nameAlg=TPM2_ALG.SHA256, attributes=attrs, dataSize=8)
            )
            try:
                handle = esapi.nv_define_space(b"", public, ESYS_TR.OWNER)
            except TSS2_Exception as e:
                if e.error == TPM2_RC.NV_DEFINED:
                    continue
                raise
            esapi.tr_close(handle)
            return index
        raise KeystoreError("no free NV index for the boot counter", "free NV space on the TPM (tpm2_nvundefine)")

    def persist(self) -> None:
        if self._sealed is None:
            raise StateError("the TPM keystore was persisted already", "activate into a new state dir")
        pub, priv = self._sealed
        write_new(self.root / KEK_PUB, pub)
        write_new(self.root / KEK_PRIV, priv)
        self._sealed = None

    def discard(self) -> None:
        try:
            handle = self._esapi.tr_from_tpmpublic(self.nv_index)
            self._esapi.nv_undefine_space(handle, ESYS_TR.OWNER)
        except TSS2_Exception:
            pass  # best effort: a leaked counter index costs 8 bytes of NV, not security
        self.close()

    # -- opening (every boot) --

    @classmethod
    def open(cls, root: Path, config: dict[str, Any], tcti_override: str | None) -> TpmKeystore:
        """Connect to the TPM named at activation (or *tcti_override*); nothing unsealed yet."""
        tcti, pcrs, nv_index = config.get("tcti"), config.get("pcrs", []), config.get("nv_index")
        base = config.get("counter_base", 0)
        if (
            not isinstance(base, int)
            or not isinstance(tcti, str)
            or not isinstance(pcrs, list)
            or not all(isinstance(p, int) for p in pcrs)
            or not isinstance(nv_index, int)
        ):
            raise StateError("state.json has a malformed tpm keystore entry", _REACTIVATE)
        use = tcti_override or tcti
        return cls(root, use, tuple(pcrs), nv_index, _connect(use), counter_base=base)

    def config(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "tcti": self.tcti,
            "pcrs": list(self.pcrs),
            "nv_index": self.nv_index,
            "counter_base": self.counter_base,
        }

    def files(self, names: tuple[str, ...]) -> list[str]:
        return [check_name(n) + SUFFIX for n in names] + [KEK_PUB, KEK_PRIV]

    def _sealed_kek(self) -> tuple[Any, Any]:
        try:
            pub, _ = TPM2B_PUBLIC.unmarshal(bytes(read_into(self.root / KEK_PUB)))
            priv, _ = TPM2B_PRIVATE.unmarshal(bytes(read_into(self.root / KEK_PRIV)))
        except FileNotFoundError as e:
            raise StateError(f"{e.filename} is missing", _REACTIVATE) from None
        except (TSS2_Exception, ValueError, IndexError):
            raise StateError(f"{KEK_PUB}/{KEK_PRIV} do not parse as a TPM object", _REACTIVATE) from None
        return pub, priv

    # -- what attestation (agent.attest) uses: the TPM, its storage key, the sealed KEK object --

    @property
    def esapi(self) -> ESAPI:
        """The open TPM connection (agent.attest signs evidence through it)."""
        return self._esapi

    def storage_primary(self) -> Any:
        """A handle of the owner hierarchy's storage primary key; the caller flushes it."""
        try:
            return self._primary(self._esapi)
        except TSS2_Exception as e:
            raise _tpm_error("the TPM refused to create its storage key", e, "check the TPM and retry") from None

    def kek_public(self) -> bytes:
        """The sealed KEK object's public area (TPM2B_PUBLIC, marshalled): what Certify names."""
        pub, _ = self._sealed_kek()
        return bytes(pub.marshal())

    def load_kek(self, primary: Any) -> Any:
        """Load the sealed KEK object under *primary*; the caller flushes the handle."""
        pub, priv = self._sealed_kek()
        try:
            return self._esapi.load(primary, priv, pub)
        except TSS2_Exception as e:
            raise KeystoreError(
                f"the TPM at {self.tcti} does not accept the appliance's sealed key ({e}): this state "
                "dir was sealed by another TPM (a copied disk?) or this TPM was cleared",
                _REACTIVATE,
            ) from None

    def _unseal(self) -> bytearray:
        esapi = self._esapi
        primary = self.storage_primary()
        try:
            obj = self.load_kek(primary)
            session = esapi.start_auth_session(
                primary, ESYS_TR.NONE, TPM2_SE.POLICY if self.pcrs else TPM2_SE.HMAC, _aes_cfb(), TPM2_ALG.SHA256
            )
            try:
                esapi.trsess_set_attributes(session, TPMA_SESSION.ENCRYPT | TPMA_SESSION.CONTINUESESSION)
                if self.pcrs:
                    esapi.policy_pcr(session, TPM2B_DIGEST(), _selection(self.pcrs))
                try:
                    data = esapi.unseal(obj, session1=session)
                except TSS2_Exception as e:
                    if e.error in (TPM2_RC.POLICY_FAIL, TPM2_RC.PCR_CHANGED):
                        pcr_list = ",".join(str(p) for p in self.pcrs)
                        raise PcrMismatchError(
                            f"the TPM refuses to unseal the appliance's keys: PCR {pcr_list} no longer "
                            "hold(s) the values of activation (the measured boot state changed)"
                        ) from None
                    raise _tpm_error("the TPM refused to unseal the appliance's key", e, _REACTIVATE) from None
                kek = bytearray(bytes(data))
                data.buffer[0 : data.size] = bytes(data.size)  # the cffi copy, too
                return kek
            finally:
                esapi.flush_context(session)
                esapi.flush_context(obj)
        finally:
            esapi.flush_context(primary)

    def _key(self) -> bytearray:
        if self._kek is None:
            self._kek = self._unseal()
        return self._kek

    # -- secrets --

    def store(self, name: str, data: bytes | bytearray) -> None:
        nonce = os.urandom(_NONCE)
        sealed = AESGCM(self._key()).encrypt(nonce, bytes(data), _AAD + check_name(name).encode())
        store_atomically(self.root / (name + SUFFIX), _MAGIC + nonce + sealed)

    def load(self, name: str) -> bytearray:
        path = self.root / (check_name(name) + SUFFIX)
        try:
            blob = read_into(path)
        except FileNotFoundError:
            raise StateError(f"{path} is missing", _REACTIVATE) from None
        if len(blob) < len(_MAGIC) + _NONCE + 16 or blob[: len(_MAGIC)] != _MAGIC:
            raise StateError(f"{path} is not a keystore envelope", _REACTIVATE)
        nonce = bytes(blob[len(_MAGIC) : len(_MAGIC) + _NONCE])
        out = bytearray(len(blob) - len(_MAGIC) - _NONCE - 16)
        try:
            # decrypt_into: the plaintext goes straight into a buffer we can wipe.
            AESGCM(self._key()).decrypt_into(nonce, bytes(blob[len(_MAGIC) + _NONCE :]), _AAD + name.encode(), out)
        except InvalidTag:
            raise StateError(
                f"{path} does not decrypt under the TPM-held key (tampered or swapped)", _REACTIVATE
            ) from None
        return out

    # -- boot counter --

    def next_boot(self) -> int:
        try:
            handle = self._esapi.tr_from_tpmpublic(self.nv_index)
            try:
                self._esapi.nv_increment(handle, handle)
                value = self._esapi.nv_read(handle, 8, 0, handle)
            finally:
                self._esapi.tr_close(handle)
        except TSS2_Exception as e:
            raise _tpm_error(
                f"the TPM's boot counter (NV {self.nv_index:#x}) is unusable", e, _REACTIVATE
            ) from None
        return self.counter_base + int.from_bytes(bytes(value), "big")

    def lock(self) -> None:
        if self._kek is not None:
            wipe(self._kek)
            self._kek = None

    def close(self) -> None:
        self.lock()
        try:
            self._esapi.close()
        except TSS2_Exception:
            pass
