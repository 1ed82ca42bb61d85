"""The route table (tools/platform/routes.py) is the one place that says who may call an
endpoint. These tests hold it to the published document (protocol/openapi.json, what
clients are told) and to what a live server does: a row that is wrong, missing or extra
fails here, whichever way it is wrong."""

from __future__ import annotations

import json
import time
import typing
from pathlib import Path
from typing import Any

import pytest

from protocol import api
from tests.platform.conftest import HOSTNAME, Platform, tls_client
from tests.platform.test_security import appliance_ctx, raw_exchange
from tools.platform import db, routes
from tools.platform.handlers import PlatformApp
from tools.platform.http import Exchange
from tools.platform.routes import Caller, Route

SPEC = Path(__file__).resolve().parents[2] / "protocol" / "openapi.json"
ANONYMOUS: dict[str, list[str]] = {}
MTLS = {"mtls": []}


def documented() -> dict[tuple[str, str], dict[str, Any]]:
    """The committed document's operations by (method, path)."""
    doc = json.loads(SPEC.read_text())
    return {(method.upper(), path): op for path, ops in doc["paths"].items() for method, op in ops.items()}


def test_table_and_document_agree() -> None:
    ops = documented()
    declared = {(r.method, r.template): r for r in routes.ROUTES}
    assert set(ops) == set(declared), "every route is documented and every operation has a route"
    for key, route in declared.items():
        op = ops[key]
        security = op["security"]
        assert (ANONYMOUS in security) == (route.caller is not Caller.APPLIANCE), key
        assert (MTLS in security) == (route.caller is not Caller.ANYONE), key
        assert ("401" in op["responses"]) == (route.caller is Caller.APPLIANCE), key
        params = op.get("parameters", [])
        headers = {p["name"] for p in params if p["in"] == "header" and p["required"]}
        assert (api.HEADER_SESSION in headers) == route.session, key
        assert ("428" in op["responses"]) == route.session, key
        assert tuple(p["name"] for p in params if p["in"] == "path") == route.params, key


def test_every_row_has_a_handler_of_its_shape() -> None:
    """The handler takes (exchange, caller, *path values), the caller typed as the row says;
    every endpoint-shaped method of the app is routed (none is left unreachable)."""
    caller_type = {Caller.ANYONE: type(None), Caller.OPTIONAL: db.Appliance | None, Caller.APPLIANCE: db.Appliance}
    for route in routes.ROUTES:
        hints = typing.get_type_hints(getattr(PlatformApp, route.handler))
        args = [v for k, v in hints.items() if k != "return"]
        assert args == [Exchange, caller_type[route.caller], *[int] * len(route.params)], route
    endpoints = {n for n in vars(PlatformApp) if n.startswith(("get_", "post_", "put_", "delete_"))}
    assert endpoints == {r.handler for r in routes.ROUTES}


def test_matching() -> None:
    table = routes.Table(routes.ROUTES)
    found = table.find("POST", "/v1/jobs/42/progress")
    assert (found.route.handler, found.values) == ("post_progress", (42,))
    assert table.find("GET", api.PATH_NEXT_JOB).route.handler == "get_next_job"  # literal beats {id}
    with pytest.raises(routes.NoRoute, match="no such job"):
        table.find("POST", "/v1/jobs/next/result")
    with pytest.raises(routes.NoRoute, match="no such job"):
        table.find("GET", "/v1/jobs/0/result")  # a job that cannot exist: 404 whatever the method
    with pytest.raises(routes.NoRoute, match="no such endpoint"):
        table.find("POST", "/v1/jobs/1/result/extra")
    with pytest.raises(routes.WrongMethod) as wrong:
        table.find("GET", "/v1/jobs/1/result")
    assert wrong.value.allow == ("POST",)


def test_rows_that_cannot_be_enforced_are_refused() -> None:
    with pytest.raises(ValueError, match="session"):
        Route("GET", "/v1/x", "get_x", Caller.OPTIONAL, session=True)
    with pytest.raises(ValueError, match="path parameters"):
        Route("GET", "/v1/x/{name}", "get_x", Caller.APPLIANCE)
    with pytest.raises(ValueError, match="two routes"):
        routes.Table([*routes.ROUTES, Route("GET", api.PATH_TIME, "get_config", Caller.APPLIANCE)])


def request_for(route: Route, job_id: int, extra_headers: bytes = b"") -> bytes:
    """A request that reaches *route* (a job's paths name a real queued job); a POST carries
    an empty JSON object, which no handler accepts, so nothing is changed if one runs."""
    head = f"{route.method} {route.path(id=str(job_id))} HTTP/1.1\r\nhost: {HOSTNAME}\r\n".encode()
    if route.method == "POST":
        head += b"content-type: application/json\r\ncontent-length: 2\r\n"
    return head + extra_headers + b"\r\n" + (b"{}" if route.method == "POST" else b"")


async def test_every_route_called_without_credentials_answers_as_declared(platform: Platform) -> None:
    a = await platform.activate("caller")
    job_id = platform.storage.add_job("caller", ["127.0.0.1"], "22", "builtin", None, time.time())
    ops = documented()

    # No client certificate: exactly the routes the table and the document open to anyone
    # get past the certificate check; every other one is refused as documented.
    anonymous = tls_client(platform.ca_pem)
    answered = set()
    for route in routes.ROUTES:
        status, doc = await raw_exchange(platform, anonymous, request_for(route, job_id))
        if status not in (401, 403):
            answered.add((route.method, route.template))
        else:
            assert (status, doc["reason"]) == (401, api.REASON_CLIENT_CERT_REQUIRED), route
    declared = {(r.method, r.template) for r in routes.ROUTES if r.caller is not Caller.APPLIANCE}
    published = {key for key, op in ops.items() if ANONYMOUS in op["security"]}
    assert answered == declared == published

    # The appliance's certificate but no session token: exactly the session routes say so.
    certified = appliance_ctx(platform, a)
    wants_session = set()
    for route in routes.ROUTES:
        status, doc = await raw_exchange(platform, certified, request_for(route, job_id))
        assert status not in (401, 403), (route, status, doc)
        if status == 428:
            assert doc["reason"] == api.REASON_SESSION_REQUIRED
            wants_session.add((route.method, route.template))
    declared = {(r.method, r.template) for r in routes.ROUTES if r.session}
    published = {key for key, op in ops.items() if "428" in op["responses"]}
    assert wants_session == declared == published
    assert platform.storage.job(job_id).state == "queued"  # no call got through to a job
