"""Tell the platform about a boot whose TPM refused to unseal (PCR mismatch), with evidence.

When the measured boot state changed (kernel command line, bootloader, firmware), the TPM
refuses the PCR policy of the sealed KEK, so the agent has no TLS client key and cannot
open a session: without this module the platform would only notice the appliance went
quiet. Here the agent still proves what it booted, with what does not depend on the KEK:

1. the platform nonce of ``POST /v1/attestation/boot-nonce`` over server-authenticated
   TLS (the pinned CA from activation, no client certificate; time synced first, as for
   a normal boot);
2. a TPM2_Quote by the attestation key (AK, which is not PCR-bound: it is a plain child
   of the storage primary key, usable whatever the PCRs hold) over the attested PCRs and
   that nonce;
3. ``POST /v1/attestation/boot-report`` naming the appliance; the platform verifies the
   quote with the AK it enrolled for that appliance and records the mismatch exactly as a
   session's (``pcr_mismatch`` event and state, resolved by ``appliance baseline``).

What is read here is NOT verified (state.json's MAC needs the keys the TPM withholds):
someone who can rewrite the state dir can only point the report elsewhere or suppress it,
which they could do on the network anyway; the report carries no secret and unlocks
nothing. One attempt, bounded in time; its outcome never changes the exit code (30).
"""

from __future__ import annotations

import base64
import logging
from pathlib import Path
from typing import Final

import trio

from agent import timesync
from agent.attest import Attestor
from agent.errors import AgentError, PcrMismatchError
from agent.keystore import open_keystore
from agent.keystore.tpm import TpmKeystore
from agent.state import CA_PEM, PlatformEndpoint, unverified_doc
from agent.tls import client_context
from protocol import api
from protocol.client import DEFAULT_TIMEOUT, PlatformClient, PlatformError
from protocol.proxy import ProxyConfig

log = logging.getLogger("agent.attest")

REPORT_BUDGET: Final = 2 * DEFAULT_TIMEOUT  # seconds for the whole report (time, nonce, quote, report)


class NotReported(Exception):
    """Why no report was sent or accepted (a short ``reason`` for the log and the error line)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _client(root: Path, clock: timesync.Clock) -> tuple[PlatformClient, str]:
    """A server-authenticated client to the platform of the (unverified) state, and the name."""
    try:
        doc = unverified_doc(root)
        endpoint = PlatformEndpoint.parse(str(doc["platform_url"]))
        name = str(doc["appliance"])
        proxy_doc = doc.get("proxy")
        if isinstance(proxy_doc, dict) and proxy_doc.get("credentials") is True:
            raise NotReported("the proxy's credentials are sealed by the same TPM policy")
        proxy = None if proxy_doc is None else ProxyConfig.parse(str(proxy_doc["url"]))
        ctx = client_context((root / CA_PEM).read_bytes(), clock)
    except (AgentError, KeyError, TypeError, ValueError, OSError):
        raise NotReported("the state dir does not name a usable platform") from None
    return PlatformClient(endpoint.url, ctx, proxy=proxy), name


async def _report(root: Path, attestor: Attestor) -> str:
    clock = timesync.Clock()
    client, name = _client(root, clock)
    try:
        with trio.fail_after(REPORT_BUDGET):
            await timesync.sync(client.time, clock)
            nonce = await client.session_nonce(api.PATH_BOOT_NONCE)
            quote, values = await trio.to_thread.run_sync(attestor.quote, nonce)
            return await client.boot_report({
                api.F_APPLIANCE: name,
                api.F_NONCE: base64.b64encode(nonce).decode("ascii"),
                api.F_QUOTE: {
                    api.F_ATTEST: base64.b64encode(quote.attest).decode("ascii"),
                    api.F_SIGNATURE: base64.b64encode(quote.signature).decode("ascii"),
                    api.F_PCR_VALUES: [v.hex() for v in values],
                },
            })  # fmt: skip
    except PlatformError as e:
        raise NotReported(f"the platform answered {e.reason or e.status}") from None
    except trio.TooSlowError:
        raise NotReported(f"no answer within {REPORT_BUDGET:g} s") from None
    finally:
        await client.aclose()


def report_mismatch(root: Path, tcti: str | None, error: PcrMismatchError) -> PcrMismatchError:
    """Report *error*'s boot to the platform if this TPM is enrolled; the error to exit with
    (the same exit code, its line saying whether and how the platform recorded it)."""
    try:
        keystore = open_keystore(root, unverified_doc(root).get("keystore"), tcti)
    except AgentError:
        return error  # it opened a moment ago; whatever changed since, there is nothing to add
    try:
        attestor = Attestor(keystore) if isinstance(keystore, TpmKeystore) else None
        if attestor is None or not attestor.enrolled:
            log.warning("event=pcr_mismatch_not_reported reason=not_enrolled")
            return error
        verdict = trio.run(_report, root, attestor)
    except (NotReported, AgentError) as e:
        reason = e.reason if isinstance(e, NotReported) else e.message
        log.warning("event=pcr_mismatch_not_reported reason=%r", reason)
        return PcrMismatchError(f"{error.message} (not reported to the platform: {reason})")
    finally:
        keystore.close()
    log.warning("event=pcr_mismatch_reported verdict=%s", verdict)
    return PcrMismatchError(f"{error.message} (reported to the platform: {verdict})")
