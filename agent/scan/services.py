"""Service guessing from a banner, falling back to the well-known port. Pure."""

from __future__ import annotations

import re
from typing import Final

# (pattern on the banner, service). First match wins; order from specific to generic.
_BANNER_RULES: Final[list[tuple[re.Pattern[str], str]]] = [
    (re.compile(r"^SSH-\d"), "ssh"),
    (re.compile(r"^HTTP/\d"), "http"),
    (re.compile(r"^220[ -].*\b(E?SMTP|Postfix|Exim|Sendmail)\b", re.I), "smtp"),
    (re.compile(r"^220[ -].*\bFTP\b", re.I), "ftp"),
    (re.compile(r"^220[ -]"), "ftp"),
    (re.compile(r"^\+OK\b"), "pop3"),
    (re.compile(r"^\* OK\b"), "imap"),
    (re.compile(r"^RFB \d{3}\.\d{3}"), "vnc"),
    (re.compile(r"^-ERR\b|^\$\d+\r?$|^\+PONG"), "redis"),
    (re.compile(r"mysql|MariaDB", re.I), "mysql"),
]

WELL_KNOWN_PORTS: Final[dict[int, str]] = {
    21: "ftp", 22: "ssh", 23: "telnet", 25: "smtp", 53: "domain", 80: "http", 110: "pop3",
    111: "rpcbind", 135: "msrpc", 139: "netbios-ssn", 143: "imap", 389: "ldap", 443: "https",
    445: "microsoft-ds", 465: "smtps", 587: "submission", 631: "ipp", 636: "ldaps",
    993: "imaps", 995: "pop3s", 1433: "ms-sql-s", 1521: "oracle", 2049: "nfs", 3306: "mysql",
    3389: "ms-wbt-server", 5432: "postgresql", 5900: "vnc", 6379: "redis", 8000: "http-alt",
    8080: "http-proxy", 8443: "https-alt", 9200: "elasticsearch", 27017: "mongodb",
}  # fmt: skip


def guess_service(port: int, banner: str) -> tuple[str, str]:
    """Return (service, how) where how is "banner", "port" or "none"."""
    for pattern, service in _BANNER_RULES:
        if pattern.search(banner):
            return service, "banner"
    if port in WELL_KNOWN_PORTS:
        return WELL_KNOWN_PORTS[port], "port"
    return "unknown", "none"


_PRINTABLE = re.compile(r"[^\x20-\x7e]+")


def clean_banner(raw: bytes, limit: int = 200) -> str:
    """First meaningful line(s) of a banner as printable ASCII, at most *limit* characters.

    For HTTP the status line and the Server header are kept, since they identify the
    service; other protocols keep their first line.
    """
    text = raw.decode("latin-1")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return ""
    if lines[0].startswith("HTTP/"):
        keep = [lines[0], *[ln for ln in lines[1:] if ln.lower().startswith("server:")][:1]]
        out = " | ".join(keep)
    else:
        out = lines[0]
    return _PRINTABLE.sub(" ", out)[:limit]


def http_status(raw: bytes) -> int | None:
    """The status code of an HTTP response's first line, or None."""
    m = re.match(rb"HTTP/\d(?:\.\d)? (\d{3})", raw)
    return int(m.group(1)) if m else None
