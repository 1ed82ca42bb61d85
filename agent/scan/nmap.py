"""The nmap engine: run nmap (connect scan, no DNS, light version detection) with its XML
output written to the job's scratch directory, and parse it there.

``-sT`` keeps nmap to ordinary connect() calls, the same client-only footprint as the
built-in engine (no raw sockets, nothing bound or listening); ``-n`` keeps it from sending
reverse-DNS queries; ``-Pn`` skips host discovery (ICMP needs raw sockets).
"""

from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import trio

from agent.scan.model import STATE_CLOSED, STATE_FILTERED, STATE_OPEN, HostResult, PortResult
from agent.scan.services import guess_service
from agent.scan.targets import TargetError, count_hosts
from protocol import api


class NmapError(RuntimeError):
    """nmap is missing, failed, or wrote output we cannot read."""


def nmap_path() -> str | None:
    """Absolute path of the nmap binary, or None when it is not installed."""
    return shutil.which("nmap")


def nmap_command(binary: str, targets: list[str], ports: str, xml_out: Path) -> list[str]:
    """The argv for one scan. Pure (unit-tested)."""
    return [
        binary, "-sT", "-Pn", "-n", "-sV", "--version-light", "-T4",
        "-p", ports, "-oX", str(xml_out), "--", *targets,
    ]  # fmt: skip


def parse_nmap_xml(data: bytes, targets: list[str]) -> list[HostResult]:
    """Hosts and ports from nmap's XML (-oX). Only open ports are listed; others counted."""
    try:
        root = ET.fromstring(data)  # noqa: S314 - trusted: our own nmap child wrote it
    except ET.ParseError as e:
        raise NmapError(f"nmap XML does not parse ({e})") from None
    if root.tag != "nmaprun":
        raise NmapError("nmap XML has no <nmaprun> root")
    hosts: list[HostResult] = []
    for host in root.iter("host"):
        addr_el = next(
            (a for a in host.iter("address") if a.get("addrtype") in ("ipv4", "ipv6")), None
        )
        if addr_el is None:
            continue
        address = addr_el.get("addr", "")
        user_name = next(
            (h.get("name", "") for h in host.iter("hostname") if h.get("type") == "user"), ""
        )
        target = user_name or _target_for(address, targets)
        result = HostResult(target, address)
        for port_el in host.iter("port"):
            if port_el.get("protocol") != "tcp":
                continue
            state_el = port_el.find("state")
            state = state_el.get("state", "") if state_el is not None else ""
            portid = int(port_el.get("portid", "0"))
            if state != STATE_OPEN:
                result.ports.append(
                    PortResult(portid, STATE_CLOSED if state == "closed" else STATE_FILTERED)
                )
                continue
            svc = port_el.find("service")
            name = svc.get("name", "") if svc is not None else ""
            parts = [svc.get(k, "") for k in ("product", "version", "extrainfo")] if (
                svc is not None
            ) else []
            banner = " ".join(p for p in parts if p)
            if name and name != "unknown":
                service, how = name, "nmap"
            else:
                service, how = guess_service(portid, banner)
            result.ports.append(PortResult(portid, STATE_OPEN, service, banner, how))
        for extra in host.iter("extraports"):
            state = STATE_CLOSED if extra.get("state") == "closed" else STATE_FILTERED
            count = int(extra.get("count", "0"))
            if state == STATE_CLOSED:
                result.extra_closed += count
            else:
                result.extra_filtered += count
        hosts.append(result)
    return hosts


def _target_for(address: str, targets: list[str]) -> str:
    return address if address in targets else next(
        (t for t in targets if "/" in t), address
    )


async def run_nmap(
    targets: list[str], ports: str, job_dir: Path, timeout: float
) -> list[HostResult]:
    """Run nmap with XML output in *job_dir* (on scratch) and parse it from there."""
    try:
        count_hosts(targets)  # the built-in engine's cap: nmap must not get 0.0.0.0/0 either
    except TargetError as e:
        raise NmapError(str(e)) from None
    api.parse_port_spec(ports)  # refuse malformed specs before they reach argv
    binary = nmap_path()
    if binary is None:
        raise NmapError("nmap is not installed on this appliance")
    xml_out = job_dir / "nmap.xml"
    cmd = nmap_command(binary, targets, ports, xml_out)
    with trio.move_on_after(timeout) as scope:
        proc = await trio.run_process(
            cmd, capture_stdout=True, capture_stderr=True, check=False,
            stdin=subprocess.DEVNULL,
        )
    if scope.cancelled_caught:
        raise NmapError(f"nmap did not finish within {timeout:.0f} s")
    if proc.returncode != 0:
        last = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["?"]
        raise NmapError(f"nmap exited with {proc.returncode}: {last[0][:200]}")
    return parse_nmap_xml(xml_out.read_bytes(), targets)
