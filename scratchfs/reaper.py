"""Deferred blob removal: the crypto-shred is instant, the file deletion happens off the request path.

When a file's last name and last handle go, its key is destroyed at once (the blob is from then
on undecryptable: that is the shred). Removing the blob file itself is only housekeeping, and on
a journalling backing filesystem it is the expensive part of an unlink, so it is queued here and
done by a worker thread in batches while the trio thread goes on serving requests.

Bounds: at most `capacity` names wait. When the queue is full, `defer` says no and the caller
removes the blob inline, which is the old cost, so a burst of deletions slows down instead of
growing memory (backpressure). At unmount the daemon wipes every blob of the store anyway
(`BlobStore.wipe_all`), which also covers whatever is still queued; after a crash, the queued
blobs are undecryptable leftovers that the next mount wipes before serving.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

import trio

__all__ = ["DEFAULT_CAPACITY", "BlobReaper"]

log = logging.getLogger("scratchfs.reaper")

# Enough to absorb an `rm -rf` of thousands of files; 4,096 names of 32 bytes is ~0.5 MiB.
DEFAULT_CAPACITY = 4096
# One thread hop (~0.3 ms of CPU, docs/bench.md) per batch, not per blob.
BATCH = 256
# How long a first deferred removal waits for others to join its batch.
COALESCE_S = 0.05


class BlobReaper:
    """A bounded queue of blob names to remove, drained by `run()` in a worker thread."""

    def __init__(self, remove: Callable[[str], bool], capacity: int = DEFAULT_CAPACITY) -> None:
        self._remove = remove
        self.capacity = capacity
        self._pending: deque[str] = deque()
        self._in_flight: list[str] = []  # the batch a worker thread is removing right now
        self._wakeup = trio.Event()
        self.deferred = 0
        self.inline = 0  # removals the full queue pushed back onto the request path

    def __len__(self) -> int:
        return len(self._pending)

    def defer(self, name: str) -> bool:
        """Queue *name* for removal; False if the queue is full (remove it yourself, now)."""
        if len(self._pending) >= self.capacity:
            self.inline += 1
            return False
        self._pending.append(name)
        self.deferred += 1
        self._wakeup.set()
        return True

    def _remove_batch(self, names: list[str]) -> None:
        for name in names:
            self._remove(name)  # never raises: a failure is logged by the store

    async def run(self) -> None:
        """Remove queued blobs until cancelled (the daemon's nursery owns this task)."""
        while True:
            await self._wakeup.wait()
            # Let a burst (rm -rf) gather first: woken per unlink, this loop would pay a thread
            # hop per blob, which doubled the daemon's CPU for rm -rf (measured).
            await trio.sleep(COALESCE_S)
            self._wakeup = trio.Event()
            while self._pending:
                batch = [self._pending.popleft() for _ in range(min(BATCH, len(self._pending)))]
                # Not cancellable once started: a batch always finishes, so no name is lost
                # between the queue and the disk.
                self._in_flight = batch
                try:
                    await trio.to_thread.run_sync(self._remove_batch, batch)
                finally:
                    self._in_flight = []

    def drain(self) -> int:
        """Remove everything still queued, inline (unmount, or ENOSPC); returns how many."""
        # The batch in flight too: the space it holds may be what a write is waiting for, and
        # removing a name twice is harmless (the second finds nothing).
        names = [*self._in_flight, *self._pending]
        self._pending.clear()
        self._remove_batch(names)
        return len(names)

    def log_summary(self) -> None:
        """One line at unmount: how many removals were deferred, how many the cap pushed back."""
        if self.deferred:
            log.info("event=deferred_removals deferred=%d inline=%d", self.deferred, self.inline)
