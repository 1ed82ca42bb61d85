"""Job-scope policy: which jobs a stored credential may be used for. Pure: no I/O, no SQL.

A credential sealed with scanner-seal (format v2) carries its scope in a public header:
the targets, ports and protocol the owner allows it for. The platform refuses a job whose
targets lie outside it — a convenience for the operator and a first line of defence; the
appliance enforces the sealed copy of the scope whatever the platform (or its database)
says. The CLI checks a credential's scope before storing it; storage applies
`check_job_scope` to the credential row it reads in the job's own transaction.
"""

from __future__ import annotations

from protocol import sealing
from protocol.scope import Scope, ScopeError


class PolicyError(Exception):
    """A credential cannot be used as asked (the message says what to do)."""


class OutOfScope(PolicyError):
    """A job's targets lie outside its credential's (public) scope."""


def credential_scope(sealed: bytes) -> Scope:
    """The public scope of a stored credential; PolicyError when it has none or is bad."""
    try:
        header = sealing.public_header(sealed)
        if not header:
            raise PolicyError(
                "it was sealed in format v1 and has no scope; re-seal it with scanner-seal "
                "(--target/--ports/--protocol) and add it under a new name"
            )
        return Scope.from_bytes(header)
    except (sealing.SealError, ScopeError) as e:
        raise PolicyError(f"its public scope is unreadable ({e}); re-seal it with scanner-seal") from None


def check_job_scope(name: str, sealed: bytes, targets: list[str]) -> None:
    """Refuse (OutOfScope) a job whose targets lie outside the credential's public scope."""
    try:
        sc = credential_scope(sealed)
    except PolicyError as e:
        raise OutOfScope(f"credential {name!r} cannot be used: {e}") from None
    outside = [t for t in targets if not sc.covers_job_target(t)]
    if outside:
        raise OutOfScope(
            f"targets {', '.join(outside[:5])} lie outside the scope of credential {name!r} "
            f"({', '.join(sc.targets[:5])}); drop them or re-seal the credential with a wider scope"
        )
