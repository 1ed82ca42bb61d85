"""Heartbeat end to end: a real agent beats at the platform's interval, in its boot session
(id and boot counter in every beat); stopping it turns its state to late then missing with
the alert hook run once per transition; a restart brings it back to ok (and the hook runs
once more). A real clone quarantine shows as health ``quarantined`` and stops the beats."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import signal
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from agent.exitcodes import EXIT_QUARANTINED
from tests.agent.conftest import AgentRun
from tools.demo import Platform, activate
from tools.loopback_targets import start_banner_service
from tools.platform import db

INTERVAL = 0.5
HOOK = """
import sys
with open(sys.argv[1], "a") as f:
    f.write(sys.stdin.read())
"""
MARKER = b"HeartbeatBanner_CANARY"


def listing(platform: Platform) -> dict[str, dict[str, object]]:
    return {a["name"]: a for a in json.loads(platform.cli("appliance", "list", "--json").stdout)}


def wait_health(platform: Platform, want: str, timeout: float = 60) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        app = listing(platform)["app1"]
        if app["health"] == want or time.monotonic() > deadline:
            return app
        time.sleep(0.1)


def hook_events(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def history(platform: Platform) -> list[tuple[float, dict[str, object]]]:
    s = db.Storage(platform.state / "platform.db")
    try:
        return s.heartbeat_history(s.appliance("app1").id)
    finally:
        s.close()


def test_heartbeat_states_and_alert_hook(
    platform: Platform, activated: Path, agent_factory: Callable[..., AgentRun], tmp_path: Path,
) -> None:
    platform.cli("heartbeat", "set", "--interval", str(INTERVAL), "--missing-after", "4")
    svc = start_banner_service("ssh", b"SSH-2.0-" + MARKER + b"\r\n")
    try:
        run = agent_factory(activated)
        assert wait_health(platform, "ok")["health"] == "ok", run.stderr()[-2000:]
        job = platform.cli("job", "add", "app1", "--targets", "127.0.0.1",
                           "--ports", str(svc.port)).stdout.decode().strip()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            # Health counts from activation, so "ok" may come before the first beat is stored.
            beats = history(platform)
            if beats and beats[-1][1]["jobs_done"] == 1 and beats[-1][1]["scratch"] is not None:
                break
            time.sleep(0.2)
    finally:
        svc.close()
    assert json.loads(platform.cli("job", "list", "--json").stdout)[0]["state"] == "done", job
    time.sleep(6 * INTERVAL)
    beats = history(platform)
    latest = beats[-1][1]
    # What a beat carries: health counters and usage, nothing of the scan.
    assert latest["jobs_done"] == 1 and latest["jobs_failed"] == 0
    assert latest["agent_version"] and latest["uptime"] > 0
    for key in ("scratch", "volume"):
        usage = latest[key]
        assert isinstance(usage, dict) and 0 < usage["used"] <= usage["total"], latest
    assert not any(MARKER.decode() in json.dumps(doc) for _, doc in beats)
    # Every beat names the boot session (its public id, never the token) and its counter.
    assert latest["boot_counter"] == 1 == listing(platform)["app1"]["boot_counter"]
    first_session = latest["boot_session"]
    assert isinstance(first_session, str) and re.fullmatch(r"[0-9a-f]{16}", first_session)
    assert all(doc["boot_session"] == first_session for _, doc in beats)
    # Beats arrive at the configured interval (received times on the platform).
    times = [t for t, _ in beats[-8:]]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert 0.35 <= statistics.median(gaps) <= 0.75, gaps
    assert max(gaps) < 3 * INTERVAL, gaps  # no beat skipped, even on a loaded machine

    out = tmp_path / "hook.out"
    script = tmp_path / "hook.py"
    script.write_text(HOOK)
    assert platform.cli("alert-hook", "set", f"{sys.executable} {script} {out}").returncode == 0
    run.proc.send_signal(signal.SIGTERM)
    # The late window is short (0.75-2 s after the last beat) and the agent may still be
    # unmounting: the evaluator's recorded transitions (hook runs, events) are the
    # evidence, not a poll of the list.
    deadline = time.monotonic() + 30
    while len(hook_events(out)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert run.proc.wait(timeout=120) == 0, run.stderr()[-2000:]
    missing = wait_health(platform, "missing", 30)
    assert missing["health"] == "missing" and missing["missed_beats"] >= 4
    time.sleep(4 * INTERVAL)  # more evaluation rounds: no repeated alert
    events = hook_events(out)
    assert [(e["event"], e["state"], e["previous"]) for e in events] == [
        ("heartbeat_missed", "late", "ok"), ("heartbeat_missed", "missing", "late"),
    ], events
    assert all(e["appliance"] == "app1" for e in events)
    s = db.Storage(platform.state / "platform.db")
    try:
        missed = [e[4].split()[0] for e in s.events("heartbeat_missed")]
    finally:
        s.close()
    assert missed[-2:] == ["state=late", "state=missing"], missed

    run2 = agent_factory(activated)
    assert wait_health(platform, "ok")["health"] == "ok", run2.stderr()[-2000:]
    deadline = time.monotonic() + 20
    while len(hook_events(out)) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    events = hook_events(out)
    assert [(e["event"], e["state"]) for e in events][2:] == [("heartbeat_resumed", "ok")], events
    # A fresh boot: counters restart, in a new session with the next boot counter.
    latest = history(platform)[-1][1]
    assert latest["jobs_done"] == 0
    assert latest["boot_counter"] == 2 and latest["boot_session"] != first_session
    run2.proc.send_signal(signal.SIGTERM)
    assert run2.proc.wait(timeout=120) == 0
    log = run.stderr() + run2.stderr()
    assert "event=heartbeat_started interval=0.5" in log


def test_clone_quarantine_shows_as_health_and_stops_heartbeats(
    platform: Platform, agent_factory: Callable[..., AgentRun], tmp_path: Path,
) -> None:
    platform.cli("heartbeat", "set", "--interval", str(INTERVAL))
    state = tmp_path / "appliance"
    activate(platform, "app1", state)  # file keystore: a copy of the disk is a working copy
    clone = tmp_path / "clone"
    shutil.copytree(state, clone)  # taken before the first boot: its counter starts over
    # A long poll: the request the platform refuses first is the running agent's heartbeat.
    first = agent_factory(state, "--poll-wait", "30")
    deadline = time.monotonic() + 120
    while not history(platform) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert history(platform), first.stderr()[-2000:]
    assert history(platform)[-1][1]["boot_counter"] == 1
    assert listing(platform)["app1"]["health"] == "ok"
    assert first.wait_log("event=scratch_mounted"), first.stderr()[-2000:]
    time.sleep(1.0)  # in its 30 s long poll now: no other request of it is due but beats
    second = agent_factory(clone, "--poll-wait", "30")
    # The copy boots with counter 1 again: quarantined at its session, and the original is
    # refused at its next heartbeat.
    assert second.proc.wait(timeout=120) == EXIT_QUARANTINED, second.stderr()[-2000:]
    assert first.proc.wait(timeout=120) == EXIT_QUARANTINED, first.stderr()[-2000:]
    last = first.stderr().strip().splitlines()[-1]
    assert "heartbeat" in last and "quarantined" in last, last
    app = listing(platform)["app1"]
    assert app["health"] == "quarantined" and app["quarantined"] is True and app["state"] == "active"
    assert "boot counter 1 is not above 1" in str(app["quarantine_reason"])
    # Nothing of a quarantined appliance's beats is recorded.
    since = float(app["quarantined_since"])  # type: ignore[arg-type]
    assert all(at <= since for at, _ in history(platform))
    table = platform.cli("appliance", "list").stdout.decode().splitlines()
    assert table[1].split()[:3] == ["app1", "active", "quarantined"], table
    # Clearing the quarantine returns the appliance to the heartbeat view (nobody beats).
    assert platform.cli("appliance", "clear", "app1").returncode == 0
    assert listing(platform)["app1"]["health"] in ("late", "missing")
