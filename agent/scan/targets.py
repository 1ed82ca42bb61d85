"""Turning job targets (IPs, CIDRs, hostnames) into addresses to probe."""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

import trio

from agent.scan.model import MAX_HOSTS


class TargetError(ValueError):
    """A target cannot be scanned (the message names it)."""


@dataclass(frozen=True)
class Address:
    """One address to probe, with the target it came from."""

    target: str
    address: str


# nmap reads "10.0.0-255.*" or "10.1,2.0.1" as octet ranges: one target string can name 2^32
# addresses, which the character check of protocol.api lets through ('-' is a hostname character).
_NMAP_OCTET_RANGE = re.compile(r"^[0-9*,-]+(\.[0-9*,-]+){3}$")


def _network(target: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """The network an IP or CIDR target names, or None for a hostname; TargetError if malformed."""
    try:
        return ipaddress.ip_network(target, strict=False)
    except ValueError:
        if "/" in target:
            raise TargetError(f"target {target!r} is not a valid CIDR") from None
        return None


def count_hosts(targets: list[str]) -> int:
    """How many addresses *targets* name (a hostname is one: both engines scan one address per
    name); raise TargetError above MAX_HOSTS. Pure, and counts without listing, so a job of many
    large CIDRs is refused before anything is expanded. The one cap for every engine."""
    total = 0
    for target in targets:
        if _NMAP_OCTET_RANGE.match(target) and _network(target) is None:
            raise TargetError(f"target {target!r} is an octet range; give IPs, CIDRs or hostnames")
        net = _network(target)
        total += 1 if net is None else net.num_addresses
        if total > MAX_HOSTS:
            raise TargetError(
                f"the job's targets name more than {MAX_HOSTS} addresses (at {target!r}); split the job"
            )
    return total


def expand_literal(target: str) -> list[str] | None:
    """Addresses of an IP or CIDR target, or None when *target* is a hostname. Pure."""
    try:
        return [str(ipaddress.ip_address(target))]
    except ValueError:
        pass
    if "/" not in target:
        return None
    try:
        net = ipaddress.ip_network(target, strict=False)
    except ValueError:
        raise TargetError(f"target {target!r} is not a valid CIDR") from None
    if net.num_addresses > MAX_HOSTS:
        raise TargetError(f"target {target!r} has more than {MAX_HOSTS} addresses")
    if net.num_addresses <= 2:  # /31, /32, /127, /128: every address is a host
        return [str(a) for a in net]
    return [str(a) for a in net.hosts()]


async def resolve(targets: list[str], timeout: float) -> tuple[list[Address], dict[str, str]]:
    """Addresses for every target, and an error per target that did not resolve."""
    count_hosts(targets)
    out: list[Address] = []
    errors: dict[str, str] = {}
    for target in targets:
        literal = expand_literal(target)
        if literal is not None:
            out.extend(Address(target, a) for a in literal)
            continue
        with trio.move_on_after(timeout):
            try:
                infos = await trio.socket.getaddrinfo(target, None, type=socket.SOCK_STREAM)
            except OSError as e:
                errors[target] = f"does not resolve ({e.strerror or type(e).__name__})"
                continue
            # Prefer IPv4 (A) over IPv6, and scan one address per name as nmap does.
            ordered = sorted(infos, key=lambda i: 0 if i[0] == socket.AF_INET else 1)
            out.append(Address(target, str(ordered[0][4][0])))
            continue
        errors[target] = "name resolution timed out"
    if len(out) > MAX_HOSTS:
        raise TargetError(f"job expands to {len(out)} addresses, more than {MAX_HOSTS}")
    return out, errors
