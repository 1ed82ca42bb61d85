"""A readers-writer lock for trio: shared for reads, exclusive for writes and truncates."""

from __future__ import annotations

import trio


class RWLock:
    """Many readers or one writer. Uncontended acquire does not yield (hot path)."""

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

    async def acquire_read(self) -> None:
        """Wait until no writer holds or waits for the lock, then hold it shared."""
        while self._writer or self._waiting_writers:
            await self._lot.park()
        self._readers += 1

    def release_read(self) -> None:
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
        self._writer = False
        if self._lot:
            self._lot.unpark_all()
