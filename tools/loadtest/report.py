"""The load run's measurements and its report: latencies per endpoint, errors (5xx apart),
and the text the run prints. No I/O and no platform: `tools.loadtest.run` drives the fleet
and fills a `Stats`; `render` turns the finished report into lines.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from protocol import api, client

T = TypeVar("T")


@dataclass
class Stats:
    """Latencies per endpoint and errors, for the report."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    span: dict[str, tuple[float, float]] = field(default_factory=dict)  # first start, last end
    errors: Counter[str] = field(default_factory=Counter)
    server_errors: int = 0

    async def timed(self, endpoint: str, call: Callable[..., Awaitable[T]], *args: Any) -> T:
        t0 = trio.current_time()
        try:
            result = await call(*args)
        except client.PlatformError as e:
            self.errors[f"{endpoint} {e.status or '-'} {e.reason}"] += 1
            if e.status is not None and e.status >= 500 and e.reason != api.REASON_BUSY:
                self.server_errors += 1
            raise
        t1 = trio.current_time()
        self.latencies[endpoint].append(t1 - t0)
        first = self.span.get(endpoint, (t0, t1))[0]
        self.span[endpoint] = (first, t1)
        return result

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, values in sorted(self.latencies.items()):
            v = sorted(values)
            first, last = self.span[name]
            out[name] = {
                "count": len(v),
                "per_s": round(len(v) / (last - first), 1) if last > first else 0.0,  # over its own phase
                "p50_ms": round(_pct(v, 0.50) * 1000, 1),
                "p99_ms": round(_pct(v, 0.99) * 1000, 1),
                "max_ms": round(v[-1] * 1000, 1) if v else 0.0,
            }
        return out


def _pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def render(report: dict[str, Any]) -> str:
    """The report as the lines the run prints, ending in PASS or FAIL."""
    lines = [
        f"backend={report['backend']} nodes={report['nodes']} appliances={report['appliances']} "
        f"setup={report['setup_seconds']}s run={report['run_seconds']}s",
        f"boot storm: {report['boot_storm']}",
        f"jobs: queued={report['jobs_queued']} completed={report['jobs_completed']} lost={report['jobs_lost']} "
        f"handed_out_twice={report['jobs_handed_out_twice']} bad_results={report['results_bad']} "
        f"repeat_uploads_acked={report['repeat_uploads_acked']}"
        + (f" lost_states={report['lost_states']}" if report["lost_states"] else ""),
        f"requests={report['requests']} throughput={report['requests_per_s']}/s 5xx={report['server_errors_5xx']}",
        f"{'endpoint':<26}{'count':>8}{'per_s':>9}{'p50_ms':>9}{'p99_ms':>9}{'max_ms':>9}",
    ]
    for name, e in report["endpoints"].items():
        lines.append(f"{name:<26}{e['count']:>8}{e['per_s']:>9}{e['p50_ms']:>9}{e['p99_ms']:>9}{e['max_ms']:>9}")
    if report["errors"]:
        lines.append(f"errors: {report['errors']}")
    if "slowloris" in report:
        lines.append(f"slowloris attackers: {dict(report['slowloris'])}")
    if "attack" in report:
        attack = report["attack"]
        lines.append(f"many-source attack, attacker saw: {attack.get('attacker_saw', {})}")
        lines.append(f"platform node 0 RSS (MiB): {attack['rss']}")
        legit = [
            f"{name} p50/p99 {e['p50_ms']}/{e['p99_ms']} ms (n={e['count']})"
            for name, e in report["endpoints"].items()
            if name.startswith("probe") or name in ("jobs/next (long-poll)", "progress", "result")
        ]
        lines.append("legitimate during the attack: " + "; ".join(legit))
    lines.append("PASS" if report["pass"] else "FAIL")
    return "\n".join(lines)
