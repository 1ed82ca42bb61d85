"""Medians, ratios, goal checks, and the JSON + Markdown outputs."""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tools.bench.runner import RunResult
from tools.bench.workloads import DAEMON_CPU


@dataclass(frozen=True)
class Metric:
    """One reported number: its key, label, unit and which direction is better."""

    key: str
    label: str
    unit: str
    kind: str  # "rate" (higher is better), "time" (lower is better), "memory" (lower is better)


METRICS = (
    Metric("stream_write", "streaming write (1 MiB writes + fsync)", "MB/s", "rate"),
    Metric("stream_read", "streaming read (cold cache, fresh open)", "MB/s", "rate"),
    Metric("randwrite_1j", "fio 4 KiB randwrite, 1 job QD1", "MB/s", "rate"),
    Metric("randread_1j", "fio 4 KiB randread, 1 job QD1", "MB/s", "rate"),
    Metric("randwrite_4j", "fio 4 KiB randwrite, 4 jobs", "MB/s", "rate"),
    Metric("randread_4j", "fio 4 KiB randread, 4 jobs", "MB/s", "rate"),
    Metric("tree_extract", "tar extract of the tree", "s", "time"),
    Metric("tree_ls", "ls -lR of the tree", "s", "time"),
    Metric("tree_rm", "rm -rf of the tree", "s", "time"),
    Metric("rss_tree", "daemon peak RSS during the tree", "MiB", "memory"),
    Metric("files_create", "create the empty files", "s", "time"),
    Metric("rss_files", "daemon peak RSS with the empty files", "MiB", "memory"),
    Metric("scan_write", "scan job: write results, stream, SQLite", "s", "time"),
    Metric("scan_upload", "scan job: read everything once", "s", "time"),
    Metric("scan_shred", "scan job: rm -rf", "s", "time"),
    Metric("scan_total", "scan job end to end", "s", "time"),
    Metric("rss_idle", "daemon RSS right after mount", "MiB", "memory"),
    # Daemon CPU time per unit of work: steadier than wall-clock on a shared machine.
    Metric("stream_write_cpu_us_per_mib", "daemon CPU per MiB written", "µs", "time"),
    Metric("stream_read_cpu_us_per_mib", "daemon CPU per MiB read", "µs", "time"),
    Metric("randwrite_1j_cpu_us", "daemon CPU per 4 KiB randwrite, 1 job", "µs", "time"),
    Metric("randread_1j_cpu_us", "daemon CPU per 4 KiB randread, 1 job", "µs", "time"),
    Metric("randwrite_4j_cpu_us", "daemon CPU per 4 KiB randwrite, 4 jobs", "µs", "time"),
    Metric("randread_4j_cpu_us", "daemon CPU per 4 KiB randread, 4 jobs", "µs", "time"),
)
RATIO_BASES = ("gocryptfs", "passthrough", "zerofs")
# Targets whose ratios and goals are reported: the default mount and the agent's mount.
SUBJECTS = ("scratchfs", "scratchfs-agent")

# Issue 23's targets, per configuration: (metric, compared with, minimum speed ratio). The agent's
# mount carries the speed goals; the default mount (what people debug with) must stay within
# reach of gocryptfs at small files. Memory is absolute, for both.
GOALS: dict[str, tuple[tuple[str, str, float], ...]] = {
    "scratchfs": (
        ("tree_extract", "gocryptfs", 0.8),
        ("tree_ls", "gocryptfs", 0.8),
    ),
    "scratchfs-agent": (
        ("stream_write", "gocryptfs", 1.1),
        ("stream_read", "gocryptfs", 1.1),
        ("tree_extract", "gocryptfs", 1.4),
        ("tree_ls", "gocryptfs", 3.0),
        ("tree_rm", "zerofs", 0.9),
        ("scan_total", "gocryptfs", 1.6),
        ("randread_1j", "zerofs", 0.8),
        ("randwrite_1j", "zerofs", 0.7),
    ),
}
RSS_GOAL_MIB = 150.0


def medians(result: RunResult) -> dict[str, dict[str, float]]:
    """Per target, the median over the successful rounds of every number measured."""
    per: dict[str, dict[str, list[float]]] = {}
    for s in result.samples:
        for k, v in s.metrics.items():
            per.setdefault(s.target, {}).setdefault(k, []).append(v)
    return {t: {k: statistics.median(v) for k, v in m.items()} for t, m in per.items()}


def ratio(metric: Metric, mine: float, other: float) -> float | None:
    """Speed ratio for rates and times (> 1: scratchfs is faster), size ratio for memory."""
    if metric.kind == "rate":
        return mine / other if other else None
    if metric.kind == "time":
        return other / mine if mine else None
    return mine / other if other else None


def ratios(med: dict[str, dict[str, float]], subject: str) -> dict[str, dict[str, float]]:
    """ratios[f"{subject}/{base}"][metric] for every base target present."""
    out: dict[str, dict[str, float]] = {}
    mine = med.get(subject)
    if not mine:
        return out
    for base in RATIO_BASES:
        theirs = med.get(base)
        if not theirs:
            continue
        row: dict[str, float] = {}
        for m in METRICS:
            if m.key in mine and m.key in theirs:
                r = ratio(m, mine[m.key], theirs[m.key])
                if r is not None:
                    row[m.key] = r
        out[f"{subject}/{base}"] = row
    return out


def goals(med: dict[str, dict[str, float]], subject: str = "scratchfs") -> list[dict[str, Any]]:
    """The issue's performance targets, met or missed, for what was measured."""
    rows: list[dict[str, Any]] = []
    mine = med.get(subject, {})
    by_key = {m.key: m for m in METRICS}
    for key, base, minimum in GOALS.get(subject, ()):
        theirs = med.get(base, {})
        if key not in mine or key not in theirs:
            continue
        r = ratio(by_key[key], mine[key], theirs[key])
        if r is None:
            continue
        rows.append({"subject": subject, "metric": key, "versus": base, "want": f">= {minimum:.1f}x",
                     "got": round(r, 3), "met": r >= minimum})
    if "rss_files" in mine:
        rows.append({"subject": subject, "metric": "rss_files", "versus": "absolute",
                     "want": f"<= {RSS_GOAL_MIB:.0f} MiB", "got": round(mine["rss_files"], 1),
                     "met": mine["rss_files"] <= RSS_GOAL_MIB})
    return rows


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def markdown(doc: dict[str, Any]) -> str:
    """The human-readable tables."""
    med: dict[str, dict[str, float]] = doc["medians"]
    main_targets = [t for t in doc["targets"] if not t.startswith("scratchfs-bs")]
    sweep = [t for t in doc["targets"] if t.startswith("scratchfs-bs")]
    rat: dict[str, dict[str, float]] = doc["ratios"]
    meta = doc["meta"]
    lines = [
        f"# scratchfs benchmark — {meta['date']}",
        "",
        f"{meta['host']}, {meta['cpus']} CPUs, kernel {meta['kernel']}; "
        f"{meta['rounds']} round(s), medians. Streaming size {meta['sizes']['stream_bytes']:,} "
        f"B; fio file {meta['sizes']['fio_file_bytes']:,} B, {meta['sizes']['fio_runtime_s']} s "
        f"per run, direct={int(meta['fio_direct'])}; tree {meta['tarball_files']:,} files "
        f"({meta['tarball_bytes'] / 1e6:.1f} MB); {meta['sizes']['empty_files']:,} empty files.",
        "",
    ]
    present = [m for m in METRICS if any(m.key in med.get(t, {}) for t in doc["targets"])]
    ratio_cols = [k for k in (f"{s}/{b}" for s in SUBJECTS for b in RATIO_BASES) if k in rat]
    header = ["metric", "unit", *main_targets, *ratio_cols]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|")
    for m in present:
        row = [m.label, m.unit]
        row += [_fmt(med.get(t, {}).get(m.key)) for t in main_targets]
        row += [_fmt(rat[c].get(m.key)) for c in ratio_cols]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "Ratios: for MB/s and seconds, scratchfs's speed over the other's (> 1 means "
        "scratchfs is faster); for memory, scratchfs's size over the other's (< 1 means "
        "scratchfs uses less).",
    ]
    if sweep:
        lines += ["", "## scratchfs block-size sweep", ""]
        header = ["metric", "unit", *sweep]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(["---"] * 2 + ["---:"] * len(sweep)) + "|")
        for m in present:
            if not any(m.key in med.get(t, {}) for t in sweep):
                continue
            lines.append("| " + " | ".join(
                [m.label, m.unit, *(_fmt(med.get(t, {}).get(m.key)) for t in sweep)]) + " |")
    lines += requests_table(doc)
    if doc["goals"]:
        lines += ["", "## Goals (issue 23)", "",
                  "| target | metric | versus | want | got | met |", "|---|---|---|---|---:|---|"]
        for g in doc["goals"]:
            lines.append(f"| {g['subject']} | {g['metric']} | {g['versus']} | {g['want']} | "
                         f"{g['got']} | "
                         f"{'yes' if g['met'] else '**no**'} |")
    errors = doc["errors"]
    notes = [f"- {t}: skipped ({why})" for t, why in doc["skipped"].items()]
    notes += [f"- round {e['round'] + 1} {e['target']}: {e['error']}" for e in errors]
    if doc["interrupted"]:
        notes.append("- the run was interrupted; numbers cover the rounds that finished")
    if notes:
        lines += ["", "## Notes", "", *notes]
    return "\n".join(lines) + "\n"


def requests_table(doc: dict[str, Any]) -> list[str]:
    """FUSE requests per workload phase, from the daemon's own counters (medians; scratchfs
    targets only: the other daemons keep no counts)."""
    med: dict[str, dict[str, float]] = doc["medians"]
    rows: list[str] = []
    for target in doc["targets"]:
        phases: dict[str, dict[str, float]] = {}
        for key, value in med.get(target, {}).items():
            if key.startswith("req."):
                _, phase, op = key.split(".", 2)
                phases.setdefault(phase, {})[op] = value
        for phase, ops in phases.items():
            cpu = ops.pop(DAEMON_CPU, None)
            total = ops.get("total", 0)
            detail = ", ".join(f"{op} {n:.0f}" for op, n in
                               sorted(ops.items(), key=lambda kv: -kv[1]) if op != "total")
            per_req = f"{cpu / total:.0f}" if cpu is not None and total else "-"
            cpu_ms = f"{cpu / 1000:.0f}" if cpu is not None else "-"
            rows.append(f"| {target} | {phase} | {total:.0f} | {cpu_ms} | {per_req} | {detail} |")
    if not rows:
        return []
    return ["", "## FUSE requests per workload (daemon counters)", "",
            "| target | phase | requests | daemon CPU ms | µs/request | by operation |",
            "|---|---|---:|---:|---:|---|", *rows]


def _tool_version(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    except OSError:
        return "missing"
    return (r.stdout or r.stderr).strip().splitlines()[0] if (r.stdout or r.stderr) else ""


def build_document(result: RunResult, config: dict[str, Any],
                   descriptions: dict[str, Any]) -> dict[str, Any]:
    """Everything in one JSON-serialisable document."""
    med = medians(result)
    rat: dict[str, dict[str, float]] = {}
    for subject in descriptions:
        if subject in SUBJECTS:
            rat.update(ratios(med, subject))
    uname = platform.uname()
    return {
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "host": uname.node,
            "kernel": uname.release,
            "cpus": _cpu_count(),
            "python": platform.python_version(),
            "fio": _tool_version(["fio", "--version"]),
            "tarball_files": result.tarball_files,
            "tarball_bytes": result.tarball_bytes,
            **config,
        },
        "targets": list(descriptions),
        "target_details": descriptions,
        "samples": [asdict(s) for s in result.samples],
        "medians": med,
        "ratios": rat,
        "goals": [g for subject in SUBJECTS for g in goals(med, subject)],
        "skipped": result.skipped,
        "errors": [{"round": s.round, "target": s.target, "error": s.error}
                   for s in result.samples if s.error],
        "interrupted": result.interrupted,
        "units": {m.key: m.unit for m in METRICS},
    }


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0))


def write_outputs(doc: dict[str, Any], out_dir: Path) -> tuple[Path, Path, str]:
    """Write bench-<stamp>.json/.md and latest.json/.md; return the paths and the table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    text = markdown(doc)
    js = json.dumps(doc, indent=2, sort_keys=False) + "\n"
    jpath = out_dir / f"bench-{stamp}.json"
    mpath = out_dir / f"bench-{stamp}.md"
    jpath.write_text(js)
    mpath.write_text(text)
    (out_dir / "latest.json").write_text(js)
    (out_dir / "latest.md").write_text(text)
    return jpath, mpath, text
