"""Heartbeats: the endpoint, what is stored, derived states, transitions and the alert hook."""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path

import pytest
import trio

from protocol import api, client
from tests.platform.conftest import Platform, run_cli
from tools.platform import db, health, state
from tools.platform.handlers import Database

HOOK = """
import sys, time
data = sys.stdin.read()
with open(sys.argv[1], "a") as f:
    f.write(data)
if len(sys.argv) > 2:
    time.sleep(float(sys.argv[2]))
"""


def status(**over: object) -> dict[str, object]:
    doc: dict[str, object] = {
        api.HB_AGENT_VERSION: "0.1.0",
        api.HB_BOOT_SESSION: None,
        api.HB_BOOT_COUNTER: None,
        api.HB_UPTIME: 12.5,
        api.HB_TIME_OFFSET: -0.25,
        api.HB_SCRATCH: {"used": 4096, "total": 1 << 20},
        api.HB_VOLUME: None,
        api.HB_JOBS_DONE: 3,
        api.HB_JOBS_FAILED: 1,
        api.HB_LAST_ERROR: "poll_failed reason=unavailable",
    }
    doc.update(over)
    return doc


def hook_lines(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_missed_beats_and_derived_states() -> None:
    assert health.missed_beats(0.0, 10) == 0
    assert health.missed_beats(15.0, 10) == 0  # within the grace of half an interval
    assert health.missed_beats(15.1, 10) == 1
    assert health.missed_beats(29.9, 10) == 2
    assert health.missed_beats(30.0, 10) == 3
    policy = health.Policy(interval=10, missing_after=3)

    def h(**kw: object) -> db.Health:
        base: dict[str, object] = dict(
            appliance_id=1, name="a", state=db.STATE_ACTIVE, activated_at=0.0, quarantined_at=None,
            last_seen=100.0, status=None, recorded=db.HEALTH_OK, recorded_since=None,
        )
        base.update(kw)
        return db.Health(**base)  # type: ignore[arg-type]

    assert health.derive(h(), policy, 110).state == "ok"
    assert health.derive(h(), policy, 116) == health.Derived("late", 1)
    assert health.derive(h(), policy, 130) == health.Derived("missing", 3)
    # Never seen: counted from activation.
    assert health.derive(h(last_seen=None), policy, 40).state == "missing"
    # Quarantine and deactivation override the heartbeat view; pending has no heartbeat.
    assert health.derive(h(quarantined_at=105.0), policy, 200).state == "quarantined"
    assert health.derive(h(state=db.STATE_DEACTIVATED), policy, 200).state == "deactivated"
    assert health.derive(h(state=db.STATE_PENDING, activated_at=None, last_seen=None), policy, 200).state == "pending"


async def test_heartbeat_stored_whitelisted_and_interval_returned(platform: Platform) -> None:
    platform.storage.set_setting(health.SETTING_HEARTBEAT, health.Policy(2.5, 4).to_setting())
    a = await platform.activate("hb1")
    assert (await a.client.config()).heartbeat_interval == 2.5
    # Unknown fields (what a buggy agent might add: scan data) are dropped, never stored.
    extra = status(targets=["10.0.0.1"], banner="SSH-2.0-secret", password="pw")
    assert await a.client.heartbeat(extra) == 2.5
    [h] = [x for x in platform.storage.health() if x.name == "hb1"]
    assert a.client.session is not None
    # The session that authenticated the beat is recorded, whatever the body claimed.
    assert h.status == status(boot_session=api.session_id(a.client.session), boot_counter=1)
    assert h.last_seen is not None and abs(h.last_seen - time.time()) < 5
    if platform.storage.backend == "sqlite":
        raw = platform.paths.db.read_bytes() + Path(str(platform.paths.db) + "-wal").read_bytes()
    else:  # PostgreSQL: what the tables hold (its files are the server's)
        tables = ("heartbeats", "appliance_health")
        stored = [platform.storage.execute_for_tests(f"SELECT status FROM {t}") for t in tables]
        raw = repr(stored).encode()
    assert b"SSH-2.0-secret" not in raw and b"10.0.0.1" not in raw
    # Malformed fields are refused with the usual error document.
    for bad in (status(uptime="long"), status(jobs_done=-1), status(scratch={"used": 1}),
                status(last_error="x" * (api.MAX_LAST_ERROR + 1)), status(agent_version=None)):
        with pytest.raises(client.PlatformError) as e:
            await a.client.heartbeat(bad)
        assert e.value.status == 400 and e.value.reason == api.REASON_BAD_REQUEST
    # Without a client certificate: refused.
    with pytest.raises(client.PlatformError) as e2:
        await platform.anon_client().heartbeat(status())
    assert e2.value.reason == api.REASON_CLIENT_CERT_REQUIRED


def test_history_is_bounded(tmp_path: Path) -> None:
    s = db.Storage(tmp_path / "p.db")
    try:
        s.add_appliance("a", b"h" * 32, 1e12, 0.0)
        app = s.appliance("a")
        for i in range(db.HEARTBEAT_HISTORY + 7):
            s.record_heartbeat(app.id, status(uptime=float(i)), float(i))
        hist = s.heartbeat_history(app.id)
        assert len(hist) == db.HEARTBEAT_HISTORY
        assert hist[0][1]["uptime"] == 7.0 and hist[-1][1]["uptime"] == db.HEARTBEAT_HISTORY + 6.0
        [h] = s.health()
        assert h.status is not None and h.status["uptime"] == db.HEARTBEAT_HISTORY + 6.0
    finally:
        s.close()


async def test_transitions_run_the_hook_exactly_once_each(platform: Platform, tmp_path: Path) -> None:
    out = tmp_path / "hook.out"
    script = tmp_path / "hook.py"
    script.write_text(HOOK)
    st = platform.storage
    st.set_setting(health.SETTING_HEARTBEAT, health.Policy(10.0, 3).to_setting())
    st.set_setting(health.SETTING_ALERT_HOOK, health.Hook((sys.executable, str(script), str(out)), 5).to_setting())
    await platform.activate("quiet")
    app = st.appliance("quiet")
    t0 = time.time()
    st.record_heartbeat(app.id, status(), t0)
    # Two evaluators (two database connections, as with two API nodes) race at each step.
    other = state.open_storage(platform.paths)
    dbs = [Database(st), Database(other)]
    try:

        async def step(now: float) -> None:
            async with trio.open_nursery() as n:
                for d in dbs:
                    n.start_soon(health.evaluate, d, now)

        for now, want in ((t0 + 5, []), (t0 + 16, ["late"]), (t0 + 20, ["late"]), (t0 + 31, ["late", "missing"]),
                          (t0 + 100, ["late", "missing"])):
            await step(now)
            assert [e["state"] for e in hook_lines(out)] == want, now
        st.record_heartbeat(app.id, status(), t0 + 101)
        await step(t0 + 102)
        await step(t0 + 103)
    finally:
        other.close()
    events = hook_lines(out)
    assert [(e["event"], e["state"], e["previous"]) for e in events] == [
        ("heartbeat_missed", "late", "ok"),
        ("heartbeat_missed", "missing", "late"),
        ("heartbeat_resumed", "ok", "missing"),
    ]
    assert events[0]["appliance"] == "quiet" and events[0]["missed"] == 1 and events[1]["missed"] == 3
    missed = [e for e in st.events("heartbeat_missed") if e[1] == app.id]
    assert [e[4].split()[0] for e in missed] == ["state=late", "state=missing"]
    assert len([e for e in st.events("heartbeat_resumed") if e[1] == app.id]) == 1


async def test_hook_is_bounded_in_time_and_failures_are_survived(platform: Platform, tmp_path: Path) -> None:
    out = tmp_path / "slow.out"
    script = tmp_path / "hook.py"
    script.write_text(HOOK)
    hook = health.Hook((sys.executable, str(script), str(out), "60"), timeout=1.0)
    started = trio.current_time()
    assert await health.run_hook(hook, {"appliance": "x", "state": "late"}) is None
    assert trio.current_time() - started < 10
    assert hook_lines(out) == [{"appliance": "x", "state": "late"}]  # it ran, then was killed
    gone = health.Hook((str(tmp_path / "no-such-hook"),), timeout=1.0)
    assert await health.run_hook(gone, {"appliance": "x", "state": "late"}) is None


def test_cli_list_heartbeat_and_hook_commands(tmp_path: Path) -> None:
    root = tmp_path / "p"
    script = tmp_path / "hook.py"
    script.write_text(HOOK)
    r = run_cli("init", str(root), "--hostname", "localhost", "--heartbeat-interval", "0.5",
                "--missing-after", "2", "--alert-hook", f"{sys.executable} {script} {tmp_path / 'o'}")
    assert r.returncode == 0, r.stderr
    assert run_cli("heartbeat", "show", state_dir=root).stdout.decode().startswith("heartbeat interval 0.5 s")
    shown = run_cli("alert-hook", "show", state_dir=root).stdout.decode()
    assert str(script) in shown and "timeout 10 s" in shown
    s = db.Storage(root / "platform.db")
    try:
        s.add_appliance("edge1", b"c" * 32, 1e12, time.time())
    finally:
        s.close()
    listing = json.loads(run_cli("appliance", "list", "--json", state_dir=root).stdout)
    assert [(a["name"], a["health"], a["last_seen"]) for a in listing] == [("edge1", "pending", None)]
    table = run_cli("appliance", "list", state_dir=root).stdout.decode().splitlines()
    assert table[0].split()[:4] == ["NAME", "STATE", "HEALTH", "LAST"] and "never" in table[1]
    # One-line errors with the documented exit codes.
    for args, code in (
        (("alert-hook", "set", str(tmp_path / "missing-program")), 2),
        (("alert-hook", "set", "'unbalanced"), 2),
        (("heartbeat", "set"), 2),
        (("heartbeat", "set", "--interval", "0.01"), 2),
        (("heartbeat", "set", "--missing-after", "0"), 2),
    ):
        r = run_cli(*args, state_dir=root)
        assert r.returncode == code, (args, r.stderr)
        assert len(r.stderr.decode().strip().splitlines()) == 1 and r.stderr.startswith(b"scanner-platform: ")
    assert run_cli("heartbeat", "set", "--missing-after", "5", state_dir=root).returncode == 0
    assert "missing after 5" in run_cli("heartbeat", "show", state_dir=root).stdout.decode()
    assert run_cli("alert-hook", "clear", state_dir=root).returncode == 0
    assert run_cli("alert-hook", "show", state_dir=root).stdout.decode().strip() == "none"
    # A bad hook at init creates nothing.
    r = run_cli("init", str(tmp_path / "q"), "--hostname", "localhost", "--alert-hook", "/nonexistent/hook")
    assert r.returncode == 2 and not (tmp_path / "q").exists()


async def test_agent_heartbeat_follows_the_interval_and_stops_on_deactivation(platform: Platform) -> None:
    from agent.errors import Deactivated
    from agent.heartbeat import Health, Heartbeat
    from agent.timesync import Clock

    platform.storage.set_setting(health.SETTING_HEARTBEAT, health.Policy(0.2, 3).to_setting())
    a = await platform.activate("beater")
    app = platform.storage.appliance("beater")
    counters = Health(jobs_done=2, jobs_failed=1)
    counters.error("poll_failed reason=unavailable")
    hb = Heartbeat(a.client, counters, Clock(offset=1.5), lambda: (None, None), 0.2)
    with pytest.raises(ExceptionGroup) as raised:
        async with trio.open_nursery() as nursery:
            await nursery.start(hb.run)
            with trio.fail_after(20):
                while hb.sent < 4:
                    await trio.sleep(0.05)
                # The operator changes the interval: the next answer carries it.
                platform.storage.set_setting(health.SETTING_HEARTBEAT, health.Policy(0.5, 3).to_setting())
                while hb.interval != 0.5:
                    await trio.sleep(0.05)
                platform.storage.deactivate("beater", time.time())
                await trio.sleep_forever()  # the next beat's 403 deactivated ends the task
    assert raised.group_contains(Deactivated)
    hist = platform.storage.heartbeat_history(app.id)
    assert len(hist) >= 5
    latest = hist[-1][1]
    assert latest["jobs_done"] == 2 and latest["jobs_failed"] == 1 and latest["time_offset"] == 1.5
    assert latest["last_error"] == "poll_failed reason=unavailable" and latest["scratch"] is None
    gaps = [b[0] - a_[0] for a_, b in itertools.pairwise(hist[:4])]  # the 0.2 s beats
    assert all(0.1 < g < 0.6 for g in gaps), gaps


async def test_heartbeat_needs_the_current_session(platform: Platform) -> None:
    a = await platform.activate("hb2")
    token = a.client.session
    assert token is not None
    a.client.session = None
    with pytest.raises(client.PlatformError) as e:
        await a.client.heartbeat(status())
    assert e.value.status == 428 and e.value.reason == api.REASON_SESSION_REQUIRED
    a.client.session = "not-a-session"
    with pytest.raises(client.PlatformError) as e:
        await a.client.heartbeat(status())
    assert e.value.status == 428 and e.value.reason == api.REASON_SESSION_REQUIRED
    a.client.session = token
    # The agent's own view of its session: the id it computes is the one stored.
    await a.client.heartbeat(status(boot_session=api.session_id(token), boot_counter=1))
    [h] = [x for x in platform.storage.health() if x.name == "hb2"]
    assert h.status is not None and h.status[api.HB_BOOT_SESSION] == api.session_id(token)
    assert token not in json.dumps(h.status)  # the token itself is never stored
    assert len(api.session_id(token)) == api.SESSION_ID_LEN


async def test_clone_quarantine_is_the_quarantined_health_state(platform: Platform) -> None:
    """A real clone sign (a second boot with a counter that went back) quarantines through
    clone detection's table; health derives `quarantined` from it and the beats of every
    instance are refused (403 quarantined) and not recorded."""
    a = await platform.activate("hb3")  # session with boot counter 1
    await a.client.open_session(5, "file")
    await a.client.heartbeat(status())
    st = platform.storage
    app = st.appliance("hb3")
    assert st.quarantined_at(app.id) is None
    # A copy of the disk boots with an older counter: clone detection quarantines.
    clone = client.PlatformClient(platform.url, a.client._ctx, timeout=20.0)
    with pytest.raises(client.QuarantinedError):
        await clone.open_session(3, "file")
    since = st.quarantined_at(app.id)
    assert since is not None
    policy = health.Policy.load(st)
    [h] = [x for x in st.health() if x.name == "hb3"]
    assert h.quarantined_at == since
    assert health.derive(h, policy, time.time()).state == db.HEALTH_QUARANTINED
    beats = len(st.heartbeat_history(app.id))
    with pytest.raises(client.QuarantinedError):
        await a.client.heartbeat(status())
    assert len(st.heartbeat_history(app.id)) == beats
    listing = json.loads(run_cli("appliance", "list", "--json", state_dir=platform.paths.root).stdout)
    [row] = [r for r in listing if r["name"] == "hb3"]
    assert row["health"] == "quarantined" and row["quarantined"] is True and row["boot_counter"] == 5
    # Cleared by the operator: the heartbeat view again, and beats are accepted.
    st.clear_quarantine("hb3", time.time())
    [h] = [x for x in st.health() if x.name == "hb3"]
    assert health.derive(h, policy, time.time()).state == db.HEALTH_OK
    await a.client.heartbeat(status())
    assert len(st.heartbeat_history(app.id)) == beats + 1


def test_migration_5_on_a_database_with_a_quarantine(tmp_path: Path) -> None:
    """A platform at schema 4 (sessions, quarantine) upgrades to 5 (heartbeats); an appliance
    quarantined before the upgrade shows health `quarantined` with no other flag to set."""
    path = tmp_path / "m.db"
    s = db.Storage(path, upto=4)
    s.execute_for_tests(
        "INSERT INTO appliances (name, state, created_at, code_hash, code_expires, activated_at) "
        "VALUES ('old', 'active', 0, ?, 0, 1)", (b"h" * 32,)
    )
    s.execute_for_tests("INSERT INTO quarantine (appliance_id, since, reason) VALUES (1, 5.0, 'test')")
    s.close()
    s2 = db.Storage(path)
    try:
        assert s2.schema_version() == db.SCHEMA_VERSION
        assert s2.schema_version() >= 5
        columns = [r[1] for r in s2.execute_for_tests("PRAGMA table_info(appliances)")]
        assert "quarantined_at" not in columns
        assert s2.quarantined_at(1) == 5.0
        [h] = s2.health()
        assert h.quarantined_at == 5.0
        assert health.derive(h, health.Policy(), 1e9).state == db.HEALTH_QUARANTINED
    finally:
        s2.close()
