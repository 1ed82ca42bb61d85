"""Deferred blob removal: bounded queue, backpressure, removal off the trio thread, drain."""

from __future__ import annotations

import threading

import trio

from scratchfs.reaper import BlobReaper


def test_full_queue_pushes_the_removal_back_to_the_caller() -> None:
    removed: list[str] = []
    reaper = BlobReaper(lambda n: removed.append(n) is None, capacity=2)
    assert reaper.defer("a") and reaper.defer("b")
    assert not reaper.defer("c"), "a full queue must refuse (the caller removes inline)"
    assert len(reaper) == 2 and reaper.inline == 1
    assert reaper.drain() == 2
    assert removed == ["a", "b"] and len(reaper) == 0


async def test_run_removes_in_a_worker_thread_until_cancelled() -> None:
    main = threading.get_ident()
    seen: list[tuple[str, int]] = []
    reaper = BlobReaper(lambda n: seen.append((n, threading.get_ident())) is None)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reaper.run)
        for i in range(600):  # more than one batch
            assert reaper.defer(f"b{i}")
        with trio.fail_after(10):
            while len(seen) < 600:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert [n for n, _ in seen] == [f"b{i}" for i in range(600)]
    assert all(tid != main for _, tid in seen), "removal ran on the trio thread"
    assert len(reaper) == 0
