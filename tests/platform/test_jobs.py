"""Leases and concurrency: at-least-once hand-out, exactly-once completion."""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter

import pytest
import trio

from protocol import client
from tests.platform.conftest import Appliance, Platform
from tests.platform.test_security import appliance_ctx, raw_exchange
from tools.platform.handlers import AppConfig

LEASE = 1.0


@pytest.fixture
def app_config() -> AppConfig:
    return AppConfig(lease_seconds=LEASE, max_result_bytes=256 * 1024, poll_interval=0.05)


async def test_expired_lease_is_offered_again(platform: Platform) -> None:
    a = await platform.activate("slow")
    job_id = platform.storage.add_job("slow", ["127.0.0.1"], "22", "builtin", None, time.time())
    first = await a.client.next_job(wait=2)
    assert first is not None and first.attempt == 1
    assert first.lease_expires > time.time()
    # Within the lease: not offered again.
    assert await a.client.next_job(wait=0) is None
    again = await a.client.next_job(wait=LEASE * 5)
    assert again is not None
    assert (again.id, again.attempt) == (str(job_id), 2)
    # The late upload of the first attempt and the second attempt's upload: one result.
    body = b'{"hosts": []}'
    assert await a.client.upload_result(first.id, body) == hashlib.sha256(body).hexdigest()
    assert await a.client.upload_result(again.id, body) == hashlib.sha256(body).hexdigest()
    assert platform.storage.result_count(job_id) == 1
    await trio.sleep(LEASE * 1.5)
    assert await a.client.next_job(wait=0) is None


async def _upload_partial(platform: Platform, a: Appliance, job_id: str, body: bytes) -> None:
    digest = hashlib.sha256(body).hexdigest().encode()
    await raw_exchange(
        platform,
        appliance_ctx(platform, a),
        b"POST /v1/jobs/%s/result HTTP/1.1\r\nhost: localhost\r\nx-content-sha256: %s\r\n"
        b"content-length: %d\r\n\r\n%s" % (job_id.encode(), digest, len(body), body[: len(body) // 3]),
        hang_up=True,
    )


async def test_many_appliances_every_job_completed_exactly_once(platform: Platform) -> None:
    n_appliances, jobs_each = 22, 2
    appliances: list[Appliance] = []
    async with trio.open_nursery() as n:

        async def activate(i: int) -> None:
            appliances.append(await platform.activate(f"app{i:02d}"))

        for i in range(n_appliances):
            n.start_soon(activate, i)
    expected: dict[int, str] = {}
    for a in appliances:
        for k in range(jobs_each):
            jid = platform.storage.add_job(a.name, [f"10.0.{k}.1"], "22,443", "builtin", None, time.time())
            expected[jid] = a.name
    dropped: set[str] = set()

    async def run_appliance(idx: int, a: Appliance) -> None:
        done = 0
        deadline = trio.current_time() + 60
        while done < jobs_each and trio.current_time() < deadline:
            try:
                job = await a.client.next_job(wait=LEASE * 3)
            except client.PlatformUnavailableError:
                continue
            if job is None:
                continue
            body = json.dumps({"job": job.id, "by": a.name, "hosts": []}).encode()
            await a.client.progress(job.id, f"attempt {job.attempt}")
            if idx % 3 == 0 and job.id not in dropped:
                # This appliance "crashes" mid-upload: the lease must bring the job back.
                dropped.add(job.id)
                await _upload_partial(platform, a, job.id, body)
                continue
            ack = await a.client.upload_result(job.id, body)
            assert ack == hashlib.sha256(body).hexdigest()
            if idx % 4 == 1:
                # Lost acknowledgement: the retry must not create a second result.
                assert await a.client.upload_result(job.id, body) == ack
            done += 1

    with trio.fail_after(120):
        async with trio.open_nursery() as n:
            for i, a in enumerate(appliances):
                n.start_soon(run_appliance, i, a)

    jobs = platform.storage.jobs()
    assert len(jobs) == n_appliances * jobs_each
    assert all(j.state == "done" for j in jobs), [(j.id, j.state) for j in jobs if j.state != "done"]
    completed = Counter(e[2] for e in platform.storage.events("completed"))
    assert completed == Counter(expected.keys())  # each job exactly once
    for jid, owner in expected.items():
        assert platform.storage.result_count(jid) == 1
        doc = json.loads(platform.storage.result(jid).body)
        assert (doc["job"], doc["by"]) == (str(jid), owner)
    assert dropped
    for jid_s in dropped:
        assert platform.storage.job(int(jid_s)).attempts >= 2
