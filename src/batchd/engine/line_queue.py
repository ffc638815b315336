"""The lines waiting for a sender: bounded for feeders, with a front door for retries.

``asyncio.Queue`` wakes a blocked feeder for every line a sender takes, so at full speed a
feeder task runs once per line. Here a feeder that finds the queue full sleeps until it has
drained to half, then refills it in one go: one feeder wake per ``high // 2`` lines. Lines
coming back from a backoff go in at the front and past the bound (their number is bounded by
the lines in flight), so a retry never waits behind a full queue of new lines.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Generic, TypeVar

T = TypeVar("T")


class LineQueue(Generic[T]):
    def __init__(self, high: int):
        self.high = max(2, high)
        self.low = self.high // 2
        self._items: collections.deque[T] = collections.deque()
        self._getters: collections.deque[asyncio.Future[T]] = collections.deque()
        self._room = asyncio.Event()
        self._room.set()

    def __len__(self) -> int:
        return len(self._items)

    async def put(self, item: T) -> None:
        """Add a new line; waits while the queue is full (until it is half empty)."""
        while len(self._items) >= self.high:
            self._room.clear()
            await self._room.wait()
        self._deliver(item, front=False)

    def put_front(self, item: T) -> None:
        """Add a line that must go next (a retry); never waits."""
        self._deliver(item, front=True)

    def _deliver(self, item: T, *, front: bool) -> None:
        while self._getters:
            getter = self._getters.popleft()
            if not getter.done():
                getter.set_result(item)
                return
        if front:
            self._items.appendleft(item)
        else:
            self._items.append(item)

    async def get(self) -> T:
        if self._items:
            item = self._items.popleft()
            if len(self._items) <= self.low and not self._room.is_set():
                self._room.set()
            return item
        getter: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._getters.append(getter)
        try:
            return await getter
        except asyncio.CancelledError:
            if getter.done() and not getter.cancelled():
                self._items.appendleft(getter.result())  # handed to us as we were cancelled
            else:
                self._getters.remove(getter)
            raise
