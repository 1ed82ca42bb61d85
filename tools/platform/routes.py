"""The platform's route table: one row per endpoint, the single place that says who may call it.

Each row names the method, the path template (``{name}`` marks a path parameter), the
`handlers.PlatformApp` method that serves it, who may call it and whether it needs the
appliance's boot session. The dispatcher (`PlatformApp.handle`) enforces the last two before
the handler runs, and `openapi` derives each operation's security, its 401 refusal and its
session header from the same row, so an endpoint cannot be documented one way and served
another. Adding an endpoint is one row here plus one handler (docs/platform.md shows how).

Pure: no I/O; matching a path is string work only.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from protocol import api


class Caller(enum.Enum):
    """Who may call an endpoint.

    A client certificate the TLS layer accepted is checked against the records on every
    endpoint (a revoked or unknown one is refused even where none is needed); this says
    whether one is needed and whether the handler learns whose it is.
    """

    ANYONE = "anyone"  # no certificate needed; the handler gets None (activation)
    OPTIONAL = "optional"  # the handler gets the appliance if a certificate came, else None
    APPLIANCE = "appliance"  # an active appliance's certificate, else 401 before the handler


@dataclass(frozen=True)
class PathParam:
    """A path parameter: how its segment becomes a value, and the 404 text if it cannot."""

    parse: Callable[[str], int | None]
    not_found: str


# Every {name} a template may use. The job id is named "id" as in the published document.
PATH_PARAMS: dict[str, PathParam] = {"id": PathParam(api.parse_job_id, "no such job")}
_PARAM_RE = re.compile(r"\{([a-z_]+)\}")


@dataclass(frozen=True)
class Route:
    """One endpoint. *handler* is the name of the `PlatformApp` method that serves it; it is
    called as ``handler(exchange, appliance, *path_values)``, where *appliance* is a
    ``db.Appliance`` for `Caller.APPLIANCE` and ``db.Appliance | None`` otherwise."""

    method: str
    template: str
    handler: str
    caller: Caller
    session: bool = False  # the appliance's latest session token must come with the request
    params: tuple[str, ...] = field(init=False)
    _pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.session and self.caller is not Caller.APPLIANCE:
            raise ValueError(f"{self.method} {self.template}: a session belongs to an appliance certificate")
        if self.method != self.method.upper() or not self.template.startswith("/"):
            raise ValueError(f"{self.method} {self.template}: method upper case, template absolute")
        names = tuple(_PARAM_RE.findall(self.template))
        unknown = [n for n in names if n not in PATH_PARAMS]
        if unknown or len(set(names)) != len(names):
            raise ValueError(f"{self.template}: unknown or repeated path parameters {names}")
        # A parameter is one path segment; everything else must match literally.
        parts = _PARAM_RE.split(self.template)
        regex = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>[^/]*)" for i, p in enumerate(parts))
        object.__setattr__(self, "params", names)
        object.__setattr__(self, "_pattern", re.compile(regex))

    def match(self, path: str) -> dict[str, str] | None:
        """The raw parameter segments if *path* has this route's shape, else None."""
        m = self._pattern.fullmatch(path)
        return None if m is None else m.groupdict()

    def path(self, **values: str) -> str:
        """The template filled in (tests and documents)."""
        return _PARAM_RE.sub(lambda m: values[m.group(1)], self.template)


ROUTES: tuple[Route, ...] = (
    Route("GET", api.PATH_TIME, "get_time", Caller.OPTIONAL),
    Route("POST", api.PATH_ACTIVATE, "post_activate", Caller.ANYONE),
    Route("POST", api.PATH_SESSION, "post_session", Caller.APPLIANCE),
    Route("POST", api.PATH_SESSION_NONCE, "post_session_nonce", Caller.APPLIANCE),
    Route("POST", api.PATH_ATTEST_ENROLL, "post_attest_enroll", Caller.APPLIANCE),
    Route("POST", api.PATH_ATTEST_ACTIVATE, "post_attest_activate", Caller.APPLIANCE),
    Route("POST", api.PATH_BOOT_NONCE, "post_boot_nonce", Caller.ANYONE),
    Route("POST", api.PATH_BOOT_REPORT, "post_boot_report", Caller.ANYONE),
    Route("POST", api.PATH_SEAL_KEY, "post_seal_key", Caller.APPLIANCE),
    Route("GET", api.PATH_CONFIG, "get_config", Caller.APPLIANCE),
    Route("GET", api.PATH_VOLUME_KEY, "get_keyslot_passphrase", Caller.APPLIANCE, session=True),
    Route("POST", api.PATH_VOLUME_KEY_NEXT, "post_volume_key_next", Caller.APPLIANCE, session=True),
    Route("POST", api.PATH_VOLUME_KEY_COMMIT, "post_volume_key_commit", Caller.APPLIANCE, session=True),
    Route("POST", api.PATH_CERTIFICATE, "post_certificate", Caller.APPLIANCE, session=True),
    Route("POST", api.PATH_HEARTBEAT, "post_heartbeat", Caller.APPLIANCE, session=True),
    Route("GET", api.PATH_NEXT_JOB, "get_next_job", Caller.APPLIANCE, session=True),
    Route("POST", api.result_path("{id}"), "post_result", Caller.APPLIANCE, session=True),
    Route("POST", api.progress_path("{id}"), "post_progress", Caller.APPLIANCE, session=True),
)


class NoRoute(Exception):
    """No endpoint has this path (404); the text says what was not found."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class WrongMethod(Exception):
    """The path exists but not with this method (405); *allow* lists the methods it has."""

    def __init__(self, allow: tuple[str, ...]) -> None:
        super().__init__(", ".join(allow))
        self.allow = allow


@dataclass(frozen=True)
class Match:
    """The route a request goes to and its path values, in template order."""

    route: Route
    values: tuple[int, ...]


class Table:
    """Finds the route for a method and path; built once from the rows."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes = tuple(routes)
        self._by_template: dict[str, dict[str, Route]] = {}
        for route in self.routes:
            methods = self._by_template.setdefault(route.template, {})
            if route.method in methods:
                raise ValueError(f"two routes for {route.method} {route.template}")
            methods[route.method] = route
        # Literal paths win over templates (/v1/jobs/next is not a job id).
        self._templated = [t for t in self._by_template if _PARAM_RE.search(t)]

    def find(self, method: str, path: str) -> Match:
        """The matching route (NoRoute or WrongMethod when there is none).

        A path parameter that does not parse is a 404 before the method is looked at: a
        request for a job that cannot exist is answered the same whatever its method.
        """
        methods = self._by_template.get(path)
        raw: dict[str, str] = {}
        if methods is None:
            for template in self._templated:
                candidate = self._by_template[template]
                segments = next(iter(candidate.values())).match(path)
                if segments is not None:
                    methods, raw = candidate, segments
                    break
            else:
                raise NoRoute("no such endpoint")
        route = next(iter(methods.values()))
        values: list[int] = []
        for name in route.params:
            value = PATH_PARAMS[name].parse(raw[name])
            if value is None:
                raise NoRoute(PATH_PARAMS[name].not_found)
            values.append(value)
        chosen = methods.get(method)
        if chosen is None:
            raise WrongMethod(tuple(methods))
        return Match(chosen, tuple(values))
