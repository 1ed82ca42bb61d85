"""RFC 5424 over TLS with RFC 5425 framing, against a real rsyslog (Debian rsyslog-gnutls)."""

from __future__ import annotations

import logging
from pathlib import Path

import trio
from hypothesis import given
from hypothesis import strategies as st

from agent.syslog import (
    BOM,
    SyslogForwarder,
    format_rfc5424,
    frame_octet_counting,
    parse_octet_counted,
)
from agent.timesync import Clock
from tests.agent.conftest import Rsyslog, make_pki, start_rsyslog, stop_proc


def test_rfc5424_header() -> None:
    msg = format_rfc5424(6, 0.5, "app 1", "scanner-agent", 42, "scan", "event=x ü")
    assert msg.startswith(b"<134>1 1970-01-01T00:00:00.500000Z app_1 scanner-agent 42 scan - ")
    assert msg.endswith(BOM + "event=x ü".encode())
    assert format_rfc5424(3, 0, "", "a", 1, "", "m").split(b" ")[2] == b"-"


@given(st.lists(st.binary(min_size=1, max_size=300), max_size=20))
def test_octet_counting_roundtrip(messages: list[bytes]) -> None:
    stream = b"".join(frame_octet_counting(m) for m in messages)
    got, rest = parse_octet_counted(stream)
    assert got == messages and rest == b""
    if stream:
        got, rest = parse_octet_counted(stream[:-1])
        assert got == messages[:-1] and rest


async def _run_until(forwarder: SyslogForwarder, predicate: object, timeout: float) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(forwarder.run)
        with trio.move_on_after(timeout):
            while not predicate():  # type: ignore[operator]
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()


async def test_messages_reach_real_rsyslog(rsyslog: Rsyslog) -> None:
    fwd = SyslogForwarder("127.0.0.1", rsyslog.port, rsyslog.pki.ca_pem, Clock(), "appliance-7")
    logger = logging.getLogger("agent.scan.test_syslog")
    handler = fwd.handler()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        for i in range(20):
            logger.info("event=probe n=%d", i)
    finally:
        logger.removeHandler(handler)
    await _run_until(fwd, lambda: fwd.sent >= 20, 20)
    assert fwd.sent == 20 and fwd.dropped == 0
    lines = await trio.to_thread.run_sync(
        rsyslog.wait_for, lambda got: sum("event=probe" in ln for ln in got) >= 20
    )
    probes = [ln for ln in lines if "event=probe" in ln]
    assert len(probes) == 20
    # rsyslog parsed our header: PRI/version, hostname, app name, msgid all in place.
    assert probes[0].startswith("<134>1 ")
    fields = probes[0].split(" ")
    assert fields[2] == "appliance-7" and fields[3] == "scanner-agent"
    assert fields[5] == "test_syslog"
    assert [int(p.rsplit("n=", 1)[1]) for p in probes] == list(range(20))


async def test_outage_drops_are_counted_and_reported(tmp_path: Path) -> None:
    """rsyslog down: submits never block, overflow is counted; back up: buffer + notice."""
    first = start_rsyslog(tmp_path / "r1")
    port, pki = first.port, first.pki
    stop_proc(first.proc)
    fwd = SyslogForwarder("127.0.0.1", port, pki.ca_pem, Clock(), "app", capacity=50,
                          max_backoff=0.5)
    for i in range(200):  # nothing listens: all of this returns at once
        fwd.submit(6, "scan", f"event=queued n={i}")
    assert fwd.pending() == 50 and fwd.dropped == 150
    second: Rsyslog | None = None
    async with trio.open_nursery() as nursery:
        await nursery.start(fwd.run)
        await trio.sleep(0.3)  # at least one failed connect attempt
        assert not fwd.connected and fwd.pending() == 50
        second = await trio.to_thread.run_sync(
            lambda: start_rsyslog(tmp_path / "r2", port=port, pki=pki)
        )
        try:
            with trio.move_on_after(30):
                while fwd.sent < 51:
                    await trio.sleep(0.05)
        finally:
            nursery.cancel_scope.cancel()
    try:
        lines = await trio.to_thread.run_sync(
            second.wait_for, lambda got: sum("event=queued" in ln for ln in got) >= 50
        )
    finally:
        stop_proc(second.proc)
    queued = [ln for ln in lines if "event=queued" in ln]
    assert [int(q.rsplit("n=", 1)[1]) for q in queued] == list(range(50))
    assert any("event=syslog_dropped count=150" in ln for ln in lines)


async def test_untrusted_syslog_server_gets_nothing(rsyslog: Rsyslog, tmp_path: Path) -> None:
    other_ca = make_pki(tmp_path / "other").ca_pem
    fwd = SyslogForwarder("127.0.0.1", rsyslog.port, other_ca, Clock(), "app", max_backoff=0.2)
    fwd.submit(6, "scan", "event=must_not_arrive")
    await _run_until(fwd, lambda: False, 1.0)
    assert fwd.sent == 0 and fwd.pending() == 1 and not fwd.connected
    assert not any("must_not_arrive" in ln for ln in rsyslog.lines())
