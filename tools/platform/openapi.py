"""The OpenAPI 3.1 description of the wire API, built from `protocol.api` (the names and
limits) and the route table (`routes`: who may call each operation, which need a session) so
that none of them can drift: `python -m tools.platform.openapi > protocol/openapi.json`.
tests/platform/test_openapi.py checks that the committed file is what this module builds,
and fuzzes a live server against it with schemathesis.
"""

from __future__ import annotations

import json
from typing import Any

from protocol import api, sealing
from tools.platform import openapi_attest
from tools.platform.openapi_attest import B64, evidence
from tools.platform.openapi_attest import err as _err
from tools.platform.openapi_attest import ok as _ok
from tools.platform.routes import ROUTES, Caller

# Who may call an operation, in the document's terms (the route table decides it).
_SECURITY: dict[Caller, list[dict[str, list[str]]]] = {
    Caller.ANYONE: [{}],
    Caller.OPTIONAL: [{}, {"mtls": []}],
    Caller.APPLIANCE: [{"mtls": []}],
}


def _insert_after(mapping: dict[str, Any], anchor: str, key: str, value: Any) -> dict[str, Any]:
    """A copy of *mapping* with *key* right after *anchor*: the committed document's key
    order is kept, so that regenerating it changes no byte."""
    out: dict[str, Any] = {}
    for k, v in mapping.items():
        out[k] = v
        if k == anchor:
            out[key] = value
    if key not in out:
        raise ValueError(f"no {anchor!r} to put {key!r} after")
    return out


def _apply_routes(paths: dict[str, Any]) -> None:
    """Give every operation its security, 401 refusal and session parts from its route row;
    an operation without a row, or a row without an operation, is an error."""
    documented = {(path, method.upper()) for path, ops in paths.items() for method in ops}
    declared = {(route.template, route.method) for route in ROUTES}
    if documented != declared:
        raise ValueError(
            f"document and route table disagree: undeclared {sorted(documented - declared)}, "
            f"undocumented {sorted(declared - documented)}"
        )
    session_header = {
        "name": api.HEADER_SESSION,
        "in": "header",
        "required": True,
        "description": f"token from POST {api.PATH_SESSION}",
        "schema": {"type": "string"},
    }
    for route in ROUTES:
        ops = paths[route.template]
        method = route.method.lower()
        op = _insert_after(ops[method], "summary", "security", _SECURITY[route.caller])
        if route.caller is Caller.APPLIANCE:
            refusal = _err("no client certificate: this endpoint needs mutual TLS")
            op["responses"] = _insert_after(op["responses"], "500", "401", refusal)
        if route.session:
            # Endpoints that hand out keys or jobs, or take results, need the latest session's token.
            op["parameters"] = [*op.get("parameters", []), session_header]
            op["responses"]["428"] = _err("`session_required`: no or unknown session token; open a session")
        ops[method] = op


def build() -> dict[str, Any]:
    """The OpenAPI document."""
    common = {
        "400": _err("malformed request, bad field, or digest mismatch (reason says which)"),
        "403": _err(
            "certificate revoked or appliance deactivated (`deactivated`), certificate not on record, or code refused"
        ),
        "404": _err("no such endpoint or no such job for this appliance"),
        "405": _err("method not allowed"),
        "413": _err("body larger than the limit"),
        "431": _err("request headers too large"),
        "500": _err("internal error: generic message and an `incident` id found in the server log"),
    }
    job_id = {
        "name": "id",
        "in": "path",
        "required": True,
        "description": "job id: decimal, 1 to 2^63-1",
        "schema": {"type": "string", "pattern": "^[1-9][0-9]{0,18}$"},
    }

    spec: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "scratchfs platform API",
            "version": api.API_VERSION,
            "description": (
                "Wire contract between scanner appliances and the platform (protocol/api.py is the "
                "source of the names and limits; docs/platform.md the prose). Every error body is "
                "{reason, error}; clients branch on reason. Binary values are standard base64 with padding."
            ),
        },
        "servers": [{"url": "https://platform.example:8443"}],
        "components": {
            "securitySchemes": {
                "mtls": {"type": "mutualTLS", "description": "client certificate issued at activation"}
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["reason", "error"],
                    "properties": {
                        "reason": {
                            "type": "string",
                            "enum": sorted({getattr(api, n) for n in dir(api) if n.startswith("REASON_")}),
                        },
                        "error": {"type": "string"},
                        "incident": {"type": "string", "pattern": "^[0-9a-f]{16}$"},
                    },
                },
                "Syslog": {
                    "type": ["object", "null"],
                    "required": ["host", "port", "ca"],
                    "properties": {
                        "host": {"type": "string"},
                        "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                        "ca": {"type": "string"},
                    },
                },
                "Time": {"type": "object", "required": ["time"], "properties": {"time": {"type": "number"}}},
                "ActivationRequest": {
                    "type": "object",
                    "required": ["code", "csr", "x25519_public"],
                    "properties": {
                        "code": {"type": "string", "minLength": 1, "maxLength": 64},
                        "csr": {"type": "string", "minLength": 1, "maxLength": 16384, "description": "PEM PKCS#10"},
                        "x25519_public": {
                            "type": "string",
                            "contentEncoding": "base64",
                            "description": "32 raw bytes, base64",
                        },
                        "hybrid_public": {
                            "type": "string",
                            "contentEncoding": "base64",
                            "description": f"optional: {sealing.HYBRID_PUBLIC_LEN}-byte ML-KEM-768 + X25519 key",
                        },
                    },
                },
                "SealKey": {
                    "type": "object",
                    "required": ["hybrid_public"],
                    "properties": {"hybrid_public": {"type": "string", "contentEncoding": "base64"}},
                },
                "SealKeyAck": {
                    "type": "object",
                    "required": ["appliance"],
                    "properties": {"appliance": {"type": "string"}},
                },
                "Activation": {
                    "type": "object",
                    "required": ["appliance", "certificate", "ca", "syslog"],
                    "properties": {
                        "appliance": {"type": "string"},
                        "certificate": {"type": "string"},
                        "ca": {"type": "string"},
                        "syslog": {"$ref": "#/components/schemas/Syslog"},
                    },
                },
                "VolumeKey": {
                    "type": "object",
                    "description": (
                        "key_scheme `passphrase`: sealed is the keyslot passphrase itself (context "
                        "`volume-key`; appliances not yet on split keys, epoch 0). `split`: sealed is the "
                        "platform's share of key epoch `epoch` (context `volume-share`), which opens "
                        "nothing without the appliance's own share. `next`: a pending share (migration "
                        "or rotation) until the appliance commits it"
                    ),
                    "required": ["sealed"],
                    "properties": {
                        "sealed": {"type": "string", "contentEncoding": "base64"},
                        api.F_KEY_SCHEME: {"type": "string", "enum": [api.KEY_SCHEME_PASSPHRASE, api.KEY_SCHEME_SPLIT]},
                        api.F_EPOCH: {"type": "integer", "minimum": 0, "maximum": 2**32 - 1},
                        api.F_NEXT: {"oneOf": [{"type": "null"}, {"$ref": "#/components/schemas/VolumeShare"}]},
                    },
                },
                "Config": {
                    "type": "object",
                    "required": ["syslog"],
                    "properties": {"syslog": {"$ref": "#/components/schemas/Syslog"}},
                },
                "Job": {
                    "type": "object",
                    "required": ["id", "targets", "ports", "engine", "credential", "lease_expires", "attempt"],
                    "properties": {
                        "id": {"type": "string", "pattern": "^[1-9][0-9]{0,18}$"},
                        "targets": {"type": "array", "items": {"type": "string"}},
                        "ports": {"type": "string"},
                        "engine": {"type": "string", "enum": list(api.ENGINES)},
                        "credential": {
                            "type": ["object", "null"],
                            "required": ["name", "sealed"],
                            "properties": {
                                "name": {"type": "string"},
                                "sealed": {"type": "string", "contentEncoding": "base64"},
                            },
                        },
                        "lease_expires": {"type": "number"},
                        "attempt": {"type": "integer", "minimum": 1},
                    },
                },
                "NextJob": {
                    "type": "object",
                    "required": ["job"],
                    "properties": {"job": {"$ref": "#/components/schemas/Job"}},
                },
                "ResultAck": {
                    "type": "object",
                    "required": ["sha256", "job"],
                    "properties": {
                        "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                        "job": {"type": "string"},
                    },
                },
                "Progress": {
                    "type": "object",
                    "required": ["text"],
                    "properties": {"text": {"type": "string", "maxLength": api.MAX_PROGRESS_TEXT}},
                },
            },
        },
        "paths": {
            api.PATH_TIME: {
                "get": {
                    "operationId": "getTime",
                    "summary": "platform UTC time; a certificate is optional but checked when presented",
                    "responses": {"200": _ok("epoch seconds", "Time"), **common},
                }
            },
            api.PATH_ACTIVATE: {
                "post": {
                    "operationId": "activate",
                    "summary": "one-time code + CSR + X25519 key -> client certificate",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ActivationRequest"}}},
                    },
                    "responses": {
                        "200": _ok("certificate issued", "Activation"),
                        **common,
                        "408": _err("request not received in time"),
                        "503": _err("`busy`: the unauthenticated budget is in use; retry after Retry-After"),
                    },
                }
            },
            api.PATH_VOLUME_KEY: {
                "get": {
                    "operationId": "getVolumeKey",
                    "summary": "this appliance's part of its volume key (passphrase or platform share), sealed to it",
                    "responses": {
                        "200": _ok("sealed volume-key parts", "VolumeKey"),
                        **common,
                        "503": _err("no volume key on record"),
                    },
                }
            },
            api.PATH_SEAL_KEY: {
                "post": {
                    "operationId": "uploadSealKey",
                    "summary": "this appliance's hybrid sealing key (idempotent)",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/SealKey"}}},
                    },
                    "responses": {
                        "200": _ok("recorded (or the same key again)", "SealKeyAck"),
                        **common,
                        "408": _err("request not received in time"),
                        "409": _err("`key_conflict`: a different hybrid key is on record"),
                    },
                }
            },
            api.PATH_CONFIG: {
                "get": {
                    "operationId": "getConfig",
                    "summary": "syslog target",
                    "responses": {"200": _ok("configuration", "Config"), **common},
                }
            },
            api.PATH_NEXT_JOB: {
                "get": {
                    "operationId": "nextJob",
                    "summary": "lease the next job, long-polling up to `wait` seconds",
                    "parameters": [
                        {
                            "name": api.QUERY_WAIT,
                            "in": "query",
                            "required": False,
                            "schema": {"type": "number", "minimum": 0, "maximum": api.MAX_WAIT_SECONDS},
                        }
                    ],
                    "responses": {
                        "200": _ok("a leased job", "NextJob"),
                        "204": {"description": "no job within `wait`"},
                        **common,
                    },
                }
            },
            api.PATH_JOB_PREFIX + "{id}" + api.RESULT_SUFFIX: {
                "post": {
                    "operationId": "uploadResult",
                    "summary": "the job's result document; stored exactly once, acknowledged by digest",
                    "parameters": [
                        job_id,
                        {
                            "name": api.HEADER_CONTENT_SHA256,
                            "in": "header",
                            "required": True,
                            "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                        },
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
                    },
                    "responses": {
                        "200": _ok("stored (or the same body again)", "ResultAck"),
                        **common,
                        "408": _err("request not received in time"),
                        "409": _err("job already has a different result"),
                        "411": _err("length required"),
                    },
                }
            },
            api.PATH_JOB_PREFIX + "{id}" + api.PROGRESS_SUFFIX: {
                "post": {
                    "operationId": "reportProgress",
                    "summary": "latest progress line",
                    "parameters": [job_id],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Progress"}}},
                    },
                    "responses": {
                        "204": {"description": "recorded"},
                        **common,
                        "408": _err("request not received in time"),
                    },
                }
            },
        },
    }
    paths = spec["paths"]
    paths[api.PATH_SESSION] = {
        "post": {
            "operationId": "openSession",
            "summary": "open this boot's session; a boot counter that does not grow quarantines (clone)",
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/SessionRequest"}}},
            },
            "responses": {
                "200": _ok("the session token", "Session"),
                **common,
                "408": _err("request not received in time"),
            },
        }
    }
    refused = _err(
        "`attestation_required`, `attestation_invalid`, `nonce_invalid`, `pcr_mismatch`, `not_tpm_resident`, "
        "`quarantined`, `deactivated` (docs/platform.md, Attestation)"
    )
    paths[api.PATH_SESSION]["post"]["responses"]["403"] = refused

    paths.update(openapi_attest.paths(common, refused))
    paths[api.PATH_CERTIFICATE] = {
        "post": {
            "operationId": "renewCertificate",
            "summary": "a new client certificate for a new key; the calling certificate is revoked",
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/CertificateRequest"}}},
            },
            "responses": {
                "200": _ok("the new certificate", "Certificate"),
                **common,
                "408": _err("request not received in time"),
            },
        }
    }
    paths[api.PATH_HEARTBEAT] = {
        "post": {
            "operationId": "heartbeat",
            "summary": "the appliance's health (whitelisted fields only); answers the interval to keep",
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Heartbeat"}}},
            },
            "responses": {
                "200": _ok("recorded", "HeartbeatAck"),
                **common,
                "408": _err("request not received in time"),
            },
        }
    }
    paths[api.PATH_VOLUME_KEY_NEXT] = {
        "post": {
            "operationId": "nextVolumeKeyShare",
            "summary": "the pending platform share of the next key epoch, created on the first call (idempotent)",
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"type": "object"}}},
            },
            "responses": {
                "200": _ok("the pending share, sealed (context `volume-share`)", "VolumeShare"),
                **common,
                "408": _err("request not received in time"),
                "503": _err("no volume key on record"),
            },
        }
    }
    paths[api.PATH_VOLUME_KEY_COMMIT] = {
        "post": {
            "operationId": "commitVolumeKeyShare",
            "summary": "the keyslot opens with this epoch only: the pending share becomes current and the "
            "part it replaces is destroyed with proof (repeating it is a no-op)",
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/VolumeKeyCommit"}}},
            },
            "responses": {
                "200": _ok("committed; shred_proven: the replaced part is proven gone", "VolumeKeyCommitted"),
                **common,
                "408": _err("request not received in time"),
                "409": _err("`epoch_mismatch`: the epoch is neither pending nor current"),
                "503": _err("no volume key on record"),
            },
        }
    }
    schemas = spec["components"]["schemas"]
    epoch_schema = {"type": "integer", "minimum": 1, "maximum": 2**32 - 1}
    schemas["VolumeShare"] = {
        "type": "object",
        "required": [api.F_EPOCH, api.F_SEALED],
        "properties": {api.F_EPOCH: epoch_schema, api.F_SEALED: {"type": "string", "contentEncoding": "base64"}},
    }
    schemas["VolumeKeyCommit"] = {
        "type": "object",
        "required": [api.F_EPOCH],
        "properties": {api.F_EPOCH: epoch_schema},
    }
    schemas["VolumeKeyCommitted"] = {
        "type": "object",
        "required": [api.F_EPOCH, api.F_SHRED_PROVEN],
        "properties": {api.F_EPOCH: epoch_schema, api.F_SHRED_PROVEN: {"type": "boolean"}},
    }
    schemas["Heartbeat"] = {
        "type": "object",
        "description": "fields: " + ", ".join(api.HEARTBEAT_FIELDS) + " (others are dropped, never stored)",
    }
    schemas["HeartbeatAck"] = {
        "type": "object",
        "required": [api.F_HEARTBEAT_INTERVAL],
        "properties": {api.F_HEARTBEAT_INTERVAL: {"type": "number"}},
    }

    schemas["SessionRequest"] = {
        "type": "object",
        "required": [api.F_BOOT_COUNTER, api.F_KEYSTORE],
        "description": (
            "an enrolled appliance must add nonce, quote and counter; its boot counter is then the "
            "TPM-certified one and boot_counter is ignored"
        ),
        "properties": {
            api.F_BOOT_COUNTER: {"type": "integer", "minimum": 1, "maximum": api.MAX_BOOT_COUNTER},
            api.F_KEYSTORE: {"type": "string", "enum": list(api.KEYSTORES)},
            api.F_NONCE: {**B64, "description": f"{api.NONCE_BYTES} bytes from POST {api.PATH_SESSION_NONCE}"},
            api.F_QUOTE: evidence("TPM2_Quote over the recorded PCRs, extraData = nonce", pcr_values=True),
            api.F_COUNTER: evidence("TPM2_NV_Certify of the 8-byte boot counter, extraData = nonce"),
        },
    }
    schemas.update(openapi_attest.schemas())
    schemas["Session"] = {
        "type": "object",
        "required": [api.F_SESSION],
        "properties": {api.F_SESSION: {"type": "string"}},
    }
    schemas["CertificateRequest"] = {
        "type": "object",
        "required": [api.F_CSR],
        "properties": {api.F_CSR: {"type": "string", "minLength": 1, "maxLength": 16384}},
    }
    schemas["Certificate"] = {
        "type": "object",
        "required": [api.F_CERTIFICATE],
        "properties": {api.F_CERTIFICATE: {"type": "string"}},
    }
    _apply_routes(paths)
    return spec


if __name__ == "__main__":
    print(json.dumps(build(), indent=2))
