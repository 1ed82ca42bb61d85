"""Clock offset from the platform's time endpoint (pure logic and a real platform)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agent.timesync import Clock, Sample, best_offset, sync
from agent.tls import client_context
from protocol.client import PlatformClient, PlatformTLSError
from tests.agent.conftest import make_pki
from tools.demo import Platform


def test_offset_is_server_minus_midpoint() -> None:
    s = Sample(sent=100.0, server=1000.5, received=101.0)
    assert s.round_trip == 1.0 and s.offset == 900.0


def test_best_sample_is_the_shortest_round_trip() -> None:
    slow = Sample(0.0, 50.0, 10.0)
    fast = Sample(0.0, 40.0, 0.2)
    assert best_offset([slow, fast]) is fast


async def test_sync_uses_the_answer_and_applies_it() -> None:
    clock = Clock()

    async def fake_time() -> float:  # a platform whose clock runs one hour ahead
        return time.time() + 3600.0

    await sync(fake_time, clock, samples=3)
    assert clock.synced and 3599.0 < clock.offset < 3601.0
    assert 3599.0 < clock.now() - time.time() < 3601.0


async def test_sync_retries_then_reraises_the_callers_error() -> None:
    calls = 0

    async def failing() -> float:
        nonlocal calls
        calls += 1
        raise OSError("down")

    with pytest.raises(OSError):
        await sync(failing, Clock(), samples=3)
    assert calls == 3


async def test_sync_against_the_real_platform(platform: Platform, tmp_path: Path) -> None:
    clock = Clock()
    ctx = client_context(platform.ca.read_bytes(), clock)
    await sync(PlatformClient(platform.url, ctx).time, clock)
    # Same machine: the platform's clock is ours, up to the round trip.
    assert clock.synced and abs(clock.offset) <= clock.round_trip + 1.0
    other = client_context(make_pki(tmp_path / "x").ca_pem, Clock())
    with pytest.raises(PlatformTLSError):
        await sync(PlatformClient(platform.url, other).time, Clock())
