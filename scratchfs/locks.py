"""A readers-writer lock for trio: shared for reads, exclusive for writes and truncates."""

from __future__ import annotations

from types import TracebackType

import trio

__all__ = ["RWLock"]


class RWLock:
    """Many readers or one writer. Uncontended acquire does not yield (hot path).

    Use it as trio's locks are used: ``async with lock.read():`` or ``async with lock.write():``
    (the acquire/release methods stay for callers that cannot nest a block).
    """

    __slots__ = ("_lot", "_readers", "_waiting_writers", "_writer")

    def __init__(self) -> None:
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0
        self._lot = trio.lowlevel.ParkingLot()

    @property
    def idle(self) -> bool:
        """True when nobody holds or waits for the lock (it may then be discarded)."""
        return not (self._readers or self._writer or self._waiting_writers or len(self._lot))

    def read(self) -> _Held:
        """``async with lock.read():`` holds the lock shared for the block."""
        return _Held(self, write=False)

    def write(self) -> _Held:
        """``async with lock.write():`` holds the lock exclusively for the block."""
        return _Held(self, write=True)

    async def acquire_read(self) -> None:
        """Wait until no writer holds or waits for the lock, then hold it shared."""
        while self._writer or self._waiting_writers:
            await self._lot.park()
        self._readers += 1

    def release_read(self) -> None:
        """Give up a shared hold; the last reader lets a waiting writer in."""
        self._readers -= 1
        if self._readers == 0 and self._lot:
            self._lot.unpark_all()

    async def acquire_write(self) -> None:
        """Wait until nobody holds the lock, then hold it exclusively."""
        self._waiting_writers += 1
        acquired = False
        try:
            while self._writer or self._readers:
                await self._lot.park()
            acquired = True
        finally:
            self._waiting_writers -= 1
            if not acquired:
                self._lot.unpark_all()  # readers held back for us may go now
        self._writer = True

    def release_write(self) -> None:
        """Give up the exclusive hold; everyone waiting may try again."""
        self._writer = False
        if self._lot:
            self._lot.unpark_all()


class _Held:
    """One shared or exclusive hold of an RWLock for an ``async with`` block (a plain class, not
    a generator: it runs on every read and write request)."""

    __slots__ = ("_lock", "_write")

    def __init__(self, lock: RWLock, *, write: bool) -> None:
        self._lock = lock
        self._write = write

    async def __aenter__(self) -> None:
        if self._write:
            await self._lock.acquire_write()
        else:
            await self._lock.acquire_read()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._write:
            self._lock.release_write()
        else:
            self._lock.release_read()
