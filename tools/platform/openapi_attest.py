"""The attestation part of the OpenAPI document (`openapi` builds the rest and calls
`paths` and `schemas` here), and the response helpers both use.

Session nonces, TPM enrollment, and the anonymous boot reports an appliance sends when its
TPM refuses to unseal (docs/platform.md "Boot reports").
"""

from __future__ import annotations

from typing import Any, Final

from protocol import api

B64: Final = {"type": "string", "contentEncoding": "base64"}


def err(desc: str) -> dict[str, Any]:
    """An error response whose body is the Error schema."""
    return {"description": desc, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def ok(desc: str, schema_ref: str) -> dict[str, Any]:
    """A success response whose body is *schema_ref*."""
    return {
        "description": desc,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema_ref}"}}},
    }


def evidence(desc: str, pcr_values: bool = False) -> dict[str, Any]:
    """A TPM evidence object (TPM2B_ATTEST and its signature), optionally with PCR values."""
    props: dict[str, Any] = {api.F_ATTEST: {**B64, "description": "TPM2B_ATTEST"},
                             api.F_SIGNATURE: {**B64, "description": "TPMT_SIGNATURE by the AK"}}  # fmt: skip
    if pcr_values:
        props[api.F_PCR_VALUES] = {
            "type": "array",
            "items": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            "description": "SHA-256 values of the quoted PCRs, in index order",
        }
    return {"type": "object", "required": [api.F_ATTEST, api.F_SIGNATURE], "description": desc,
            "properties": props}  # fmt: skip


def paths(common: dict[str, Any], refused: dict[str, Any]) -> dict[str, Any]:
    """The attestation operations, in document order (*common*: the shared error responses,
    *refused*: the 403 of an attestation refusal)."""

    def attest_op(op_id: str, summary: str, request: str, answer: str, desc: str) -> dict[str, Any]:
        return {
            "post": {
                "operationId": op_id,
                "summary": summary,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{request}"}}},
                },
                "responses": {
                    "200": ok(desc, answer),
                    **common,
                    "403": refused,
                    "408": err("request not received in time"),
                    "409": err("`attestation_unavailable` (no EK CA trusted) or `already_enrolled`"),
                },
            }
        }

    anonymous = {**common, "408": err("request not received in time"),
                 "503": err("`busy`: the unauthenticated budget is in use; retry after Retry-After")}  # fmt: skip
    return {
        api.PATH_SESSION_NONCE: attest_op(
            "sessionNonce",
            "a fresh single-use nonce for the next session's TPM evidence",
            "Empty",
            "Nonce",
            "the nonce",
        ),
        api.PATH_ATTEST_ENROLL: attest_op(
            "attestationEnroll",
            "enroll this appliance's TPM: EK certificate, AK, key objects -> credential challenge",
            "EnrollRequest",
            "Challenge",
            "MakeCredential's output",
        ),
        api.PATH_ATTEST_ACTIVATE: attest_op(
            "attestationActivate",
            "prove the challenge: Certify of the sealed key and the baseline quote",
            "EnrollProof",
            "Attested",
            "the appliance is attested",
        ),
        api.PATH_BOOT_NONCE: {
            "post": {
                "operationId": "bootNonce",
                "summary": f"a stateless nonce for a boot report (anonymous; valid {api.BOOT_NONCE_TTL:g} s)",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Empty"}}},
                },
                "responses": {"200": ok("the nonce", "Nonce"), **anonymous},
            }
        },
        api.PATH_BOOT_REPORT: {
            "post": {
                "operationId": "bootReport",
                "summary": "report a boot whose TPM refused to unseal: the AK's quote over a boot nonce; "
                "recorded as a PCR mismatch, never unlocks anything",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/BootReport"}}},
                },
                "responses": {
                    "200": ok("the mismatch is recorded", "BootVerdict"),
                    **anonymous,
                    "403": err(
                        "`nonce_invalid` (not ours, expired or used), `attestation_invalid` (unknown appliance, "
                        "not attested, not signed by its AK, other PCRs)"
                    ),
                    "409": err("`pcr_match`: the quote matches the baseline; there is nothing to report"),
                },
            }
        },
    }


def schemas() -> dict[str, Any]:
    """The attestation schemas, in document order."""
    out: dict[str, Any] = {}
    out["Nonce"] = {
        "type": "object",
        "required": [api.F_NONCE],
        "properties": {api.F_NONCE: {**B64, "description": f"{api.NONCE_BYTES} bytes, single use"}},
    }
    out["Empty"] = {"type": "object"}
    out["EnrollRequest"] = {
        "type": "object",
        "required": [
            api.F_EK_CERTIFICATE,
            api.F_AK_PUBLIC,
            api.F_KEK_PUBLIC,
            api.F_COUNTER_PUBLIC,
            api.F_PCRS,
            api.F_COUNTER_BASE,
            api.F_CERTIFICATE,
        ],
        "properties": {
            api.F_EK_CERTIFICATE: {**B64, "description": "DER EK certificate from NV 0x01c00002"},
            api.F_AK_PUBLIC: {**B64, "description": "TPM2B_PUBLIC of the AK (restricted ECDSA P-256 signing key)"},
            api.F_KEK_PUBLIC: {**B64, "description": "TPM2B_PUBLIC of the sealed KEK object"},
            api.F_COUNTER_PUBLIC: {**B64, "description": "TPM2B_NV_PUBLIC of the NV boot counter"},
            api.F_PCRS: {
                "type": "array",
                "items": {"type": "integer", "minimum": 0, "maximum": api.MAX_PCR_INDEX},
                "description": "PCRs the keystore is bound to (quotes cover these and PCRs 0-9)",
            },
            api.F_COUNTER_BASE: {"type": "integer", "minimum": 0},
            api.F_CERTIFICATE: {"type": "string", "description": "the client certificate of this connection (PEM)"},
        },
    }
    out["Challenge"] = {
        "type": "object",
        "required": [api.F_CREDENTIAL_BLOB, api.F_ENCRYPTED_SECRET],
        "properties": {
            api.F_CREDENTIAL_BLOB: {**B64, "description": "TPM2B_ID_OBJECT of MakeCredential(EK, secret, AK name)"},
            api.F_ENCRYPTED_SECRET: {**B64, "description": "TPM2B_ENCRYPTED_SECRET"},
        },
    }
    out["EnrollProof"] = {
        "type": "object",
        "required": [api.F_CERTIFY, api.F_QUOTE],
        "properties": {
            api.F_CERTIFY: evidence("TPM2_Certify of the KEK object, extraData = attestation_binding(...)"),
            api.F_QUOTE: evidence("baseline TPM2_Quote, extraData = the same binding", pcr_values=True),
        },
    }
    out["Attested"] = {
        "type": "object",
        "required": [api.F_ATTESTATION],
        "properties": {api.F_ATTESTATION: {"type": "string", "enum": ["attested"]}},
    }
    out["BootReport"] = {
        "type": "object",
        "required": [api.F_APPLIANCE, api.F_NONCE, api.F_QUOTE],
        "properties": {
            api.F_APPLIANCE: {"type": "string", "pattern": api.NAME_RE.pattern,
                              "description": "the appliance's name (the platform checks its enrolled AK)"},
            api.F_NONCE: {**B64, "description": f"{api.NONCE_BYTES} bytes from POST {api.PATH_BOOT_NONCE}"},
            api.F_QUOTE: evidence("TPM2_Quote over the recorded PCRs, extraData = nonce", pcr_values=True),
        },
    }  # fmt: skip
    out["BootVerdict"] = {
        "type": "object",
        "required": [api.F_VERDICT],
        "properties": {api.F_VERDICT: {"type": "string", "enum": [api.VERDICT_PCR_MISMATCH]}},
    }
    return out
