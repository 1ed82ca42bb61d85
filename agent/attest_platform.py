"""Remote attestation, the conversation: agent.attest's TPM evidence to the platform.

- `enroll`: after activation (or a migration into the TPM, or ``scanner-agent attest``),
  two requests bind this TPM to the appliance on the platform (docs/platform.md).
- `boot_evidence`: every boot, a platform nonce, the advanced boot counter and the TPM's
  signed quote and counter certification, for ``POST /v1/session``.
"""

from __future__ import annotations

import base64
import logging
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.attest import Attestor, Evidence
from agent.keystore.tpm import TpmKeystore
from agent.state import AgentState
from protocol import api
from protocol.client import PlatformClient

log = logging.getLogger("agent.attest")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _evidence(ev: Evidence) -> dict[str, str]:
    return {api.F_ATTEST: _b64(ev.attest), api.F_SIGNATURE: _b64(ev.signature)}


def _quote(ev: Evidence, values: list[bytes]) -> dict[str, Any]:
    return {**_evidence(ev), api.F_PCR_VALUES: [v.hex() for v in values]}


def tls_public_der(cert_pem: bytes) -> bytes:
    """SubjectPublicKeyInfo DER of the appliance's client certificate (what TLS proves)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    return cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def attestor_for(state: AgentState) -> Attestor | None:
    """The attestor of an enrolled TPM appliance (None: file keystore or never enrolled)."""
    if not isinstance(state.keystore, TpmKeystore):
        return None
    attestor = Attestor(state.keystore)
    return attestor if attestor.enrolled else None


async def enroll(client: PlatformClient, state: AgentState) -> str:
    """Enroll the appliance's TPM with the platform; return its verdict (``attested``).

    Raises agent.attest.AttestationUnavailable when the TPM has no EK certificate, and
    PlatformError when the platform refuses (its reason says why).
    """
    if not isinstance(state.keystore, TpmKeystore):
        raise TypeError("only a tpm keystore can be attested")
    x25519_public, hybrid_public = state.sealing_publics()
    return await enroll_keys(client, Attestor(state.keystore), state.cert_pem, x25519_public, hybrid_public)


async def enroll_keys(
    client: PlatformClient, attestor: Attestor, cert_pem: bytes, x25519_public: bytes, hybrid_public: bytes
) -> str:
    """`enroll` for an appliance given by its attestor, certificate and sealing public keys."""
    enrollment = await trio.to_thread.run_sync(attestor.enrollment)
    blob, encrypted = await client.attestation_enroll({
        api.F_EK_CERTIFICATE: _b64(enrollment.ek_certificate),
        api.F_AK_PUBLIC: _b64(enrollment.ak_public),
        api.F_KEK_PUBLIC: _b64(enrollment.kek_public),
        api.F_COUNTER_PUBLIC: _b64(enrollment.counter_public),
        api.F_PCRS: list(enrollment.pcrs),
        api.F_COUNTER_BASE: enrollment.counter_base,
        api.F_CERTIFICATE: cert_pem.decode("ascii"),
    })  # fmt: skip
    secret = await trio.to_thread.run_sync(attestor.activate_credential, blob, encrypted)
    binding = api.attestation_binding(secret, tls_public_der(cert_pem), x25519_public, hybrid_public)
    certify = await trio.to_thread.run_sync(attestor.certify_kek, binding)
    quote, values = await trio.to_thread.run_sync(attestor.quote, binding)
    verdict = await client.attestation_activate(
        {api.F_CERTIFY: _evidence(certify), api.F_QUOTE: _quote(quote, values)}
    )
    pcrs = ",".join(map(str, api.attested_pcrs(enrollment.pcrs)))
    log.info("event=attestation_enrolled verdict=%s pcrs=%s", verdict, pcrs)
    return verdict


async def boot_evidence(client: PlatformClient, attestor: Attestor) -> tuple[int, dict[str, Any]]:
    """Advance the boot counter and prove it: (counter, the session request's evidence fields)."""
    nonce = await client.session_nonce()

    def collect() -> tuple[int, Evidence, list[bytes], Evidence]:
        counter = attestor.keystore.next_boot()
        quote, values = attestor.quote(nonce)
        return counter, quote, values, attestor.certify_counter(nonce)

    counter, quote, values, certified = await trio.to_thread.run_sync(collect)
    return counter, {
        api.F_NONCE: _b64(nonce),
        api.F_QUOTE: _quote(quote, values),
        api.F_COUNTER: _evidence(certified),
    }
