"""Reading a powered-off appliance disk from the host, as an auditor would.

No loop device, no mount: partitions are found with ``sfdisk -J`` and read by offset, the
ESP is read and written with mtools (``-i disk@@OFFSET``), ext4 files are read with
``debugfs``. Also the parsing of nmap's XML output for the exposure check.
"""

from __future__ import annotations

import json
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

CHUNK = 4 * 1024 * 1024
SECTOR = 512


class DiskError(RuntimeError):
    """A disk could not be read (the message says which step)."""


@dataclass(frozen=True)
class Partition:
    """One GPT partition: byte offset and size."""

    name: str
    offset: int
    size: int


def _run(args: list[str], input_: bytes | None = None, timeout: float = 300) -> bytes:
    proc = subprocess.run(args, input=input_, capture_output=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise DiskError(f"{' '.join(args[:3])} exited {proc.returncode}: {proc.stderr.decode(errors='replace')[-500:]}")
    return proc.stdout


def partitions(disk: Path) -> dict[str, Partition]:
    """The disk's GPT partitions by name (sfdisk -J)."""
    table = json.loads(_run(["sfdisk", "-J", str(disk)]))["partitiontable"]
    sector = int(table.get("sectorsize", SECTOR))
    return {p["name"]: Partition(p["name"], p["start"] * sector, p["size"] * sector) for p in table["partitions"]}


def scan_for(path: Path, needles: dict[str, bytes]) -> list[str]:
    """Names of the *needles* found anywhere in *path* (read in overlapping chunks)."""
    overlap = max(len(n) for n in needles.values()) - 1
    found: set[str] = set()
    tail = b""
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            window = tail + chunk
            found.update(name for name, needle in needles.items() if needle in window)
            tail = window[-overlap:] if overlap > 0 else b""
    return sorted(found)


def extract_partition(disk: Path, part: Partition, out: Path) -> None:
    """Copy one partition into its own (sparse) file."""
    _run(["dd", f"if={disk}", f"of={out}", "bs=1M", f"skip={part.offset}", f"count={part.size}",
          "iflag=skip_bytes,count_bytes", "conv=sparse", "status=none"], timeout=600)


def debugfs_dump(ext4_image: Path, name: str, out: Path) -> None:
    """Copy file *name* out of an ext4 image without mounting it."""
    out.unlink(missing_ok=True)
    _run(["debugfs", "-R", f"dump /{name} {out}", str(ext4_image)])
    if not out.exists():
        raise DiskError(f"{name} is not in {ext4_image}")


def _esp(disk: Path) -> str:
    return f"{disk}@@{partitions(disk)['esp'].offset}"


def esp_read(disk: Path, path: str) -> bytes:
    """A file of the disk's EFI system partition."""
    return _run(["mtype", "-i", _esp(disk), f"::{path}"])


def esp_write(disk: Path, path: str, data: bytes) -> None:
    """Replace a file of the disk's EFI system partition."""
    _run(["mcopy", "-o", "-i", _esp(disk), "-", f"::{path}"], input_=data)


def _ports(xml_text: str) -> list[tuple[str, int, str]]:
    root = ET.fromstring(xml_text)  # noqa: S314 - nmap's own output
    return [(p.get("protocol", ""), int(p.get("portid", "0")), p.find("state").get("state", ""))  # type: ignore[union-attr]
            for p in root.iter("port")]


def nmap_open_ports(xml_text: str) -> list[tuple[str, int, str]]:
    """Ports nmap found open (``open``; ``open|filtered`` is what a silent drop looks like
    for UDP and is not counted)."""
    return [p for p in _ports(xml_text) if p[2] == "open"]


def nmap_summary(xml_text: str) -> dict[str, int]:
    """How many ports ended in each state, including the ones nmap folds into extraports."""
    root = ET.fromstring(xml_text)  # noqa: S314 - nmap's own output
    counts: dict[str, int] = {}
    for extra in root.iter("extraports"):
        counts[extra.get("state", "?")] = counts.get(extra.get("state", "?"), 0) + int(extra.get("count", "0"))
    for _proto, _port, st in _ports(xml_text):
        counts[st] = counts.get(st, 0) + 1
    return counts
