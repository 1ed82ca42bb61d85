"""The OpenAPI 3.1 description (protocol/openapi.json) is honest: it names every path and
reason of protocol/api.py, and schemathesis fuzzing a live `scanner-platform serve` (real
mTLS) finds no 5xx and no response outside the description. Budget: a fixed number of
examples per operation (make test stays quick)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
import trio
from hypothesis import HealthCheck, settings
from schemathesis import checks

from protocol import api, client, sealing
from tests.platform.conftest import HOSTNAME, PLATFORM, run_cli, tls_client
from tools.children import stop_child
from tools.platform import openapi

SPEC = Path(__file__).resolve().parents[2] / "protocol" / "openapi.json"
SCHEMA = schemathesis.openapi.from_path(SPEC)
EXAMPLES = 25


def test_description_matches_the_wire_contract() -> None:
    doc = json.loads(SPEC.read_text())
    assert doc == openapi.build(), "regenerate: python -m tools.platform.openapi > protocol/openapi.json"
    assert doc["openapi"].startswith("3.1")
    paths = {getattr(api, n) for n in dir(api) if n.startswith("PATH_") and n != "PATH_JOB_PREFIX"}
    expected = paths | {api.result_path("{id}"), api.progress_path("{id}")}
    assert set(doc["paths"]) == expected
    reasons = {getattr(api, n) for n in dir(api) if n.startswith("REASON_")}
    assert set(doc["components"]["schemas"]["Error"]["properties"]["reason"]["enum"]) == reasons


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, requests.Session]]:
    """A served platform (SQLite) with one activated appliance and a queued job; a requests
    session presenting that appliance's certificate."""
    tmp = tmp_path_factory.mktemp("openapi")
    root = tmp / "st"
    assert run_cli("init", str(root), "--hostname", HOSTNAME).returncode == 0
    with open(tmp / "serve.log", "wb") as log:
        proc = subprocess.Popen(
            [*PLATFORM, "serve", str(root), "--listen", "127.0.0.1:0", "--poll-interval", "0.05"],
            stdout=subprocess.PIPE,
            stderr=log,
        )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline().decode().rsplit(":", 1)[1])
        url = f"https://{HOSTNAME}:{port}"
        code = run_cli("appliance", "add", "fuzz", state_dir=root).stdout.decode().strip()
        key_pem, csr = client.new_client_key_and_csr("fuzz")
        _, xpub = sealing.generate_keypair()
        ca_pem = (root / "ca.pem").read_bytes()

        async def activate() -> tuple[Any, str]:
            res = await client.PlatformClient(url, tls_client(ca_pem)).activate(code, csr, xpub)
            mtls = client.PlatformClient(url, tls_client(ca_pem, res.certificate_pem, key_pem))
            return res, await mtls.open_session(1, "file")

        res, token = trio.run(activate)
        assert run_cli("job", "add", "fuzz", "--targets", "127.0.0.1", "--ports", "22", state_dir=root).returncode == 0
        (tmp / "cert.pem").write_bytes(res.certificate_pem)
        (tmp / "key.pem").write_bytes(key_pem)
        session = requests.Session()
        session.verify = str(root / "ca.pem")
        session.cert = (str(tmp / "cert.pem"), str(tmp / "key.pem"))
        session.headers[api.HEADER_SESSION] = token
        yield url, session
        session.close()
        assert b"Traceback" not in (tmp / "serve.log").read_bytes()
    finally:
        stop_child(proc, patience=15)
        if proc.stdout is not None:
            proc.stdout.close()


@SCHEMA.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_live_server_conforms(case: schemathesis.Case, live: tuple[str, requests.Session]) -> None:
    url, session = live
    if case.headers and api.HEADER_SESSION in case.headers:
        # The session header is a real token, not a generated string (else every gated
        # operation would only ever see 428).
        case.headers[api.HEADER_SESSION] = str(session.headers[api.HEADER_SESSION])
    wait = (case.query or {}).get(api.QUERY_WAIT)
    try:
        seconds = float(wait)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        seconds = 0.0
    if 0.2 < seconds <= api.MAX_WAIT_SECONDS:
        case.query[api.QUERY_WAIT] = 0.2  # a valid long-poll, kept short for the time budget
    case.call_and_validate(
        base_url=url,
        session=session,
        timeout=30,
        verify=session.verify,
        cert=session.cert,
        checks=[
            checks.not_a_server_error,
            checks.status_code_conformance,
            checks.content_type_conformance,
            checks.response_schema_conformance,
        ],
    )
