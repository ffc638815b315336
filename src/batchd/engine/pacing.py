"""The pacing primitives of a lane, each small and clock-injected so tests need no sleeps.

- ``RateBudget``: requests/min or tokens/min as a smooth schedule (GCRA, the virtual-clock
  form of a token bucket): each reservation gets the time at which it may go, so a lane runs
  at its limit instead of bursting into 429s and then idling.
- ``ConcurrencyWindow``: AIMD; halves on overload signals (429, 503, timeouts), grows by about
  one per window of clean calls.
- ``Health``: an upstream that fails everything (connection refused, 5xx in a row) is *down*;
  while down, one probe at a time finds out when it is back, and lines wait instead of
  spending their attempts.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import Callable

Clock = Callable[[], float]


class RateBudget:
    """``per_minute`` units (requests or tokens) spread evenly over time.

    ``reserve(n)`` returns how long to wait before spending ``n`` units, and books them.
    Up to ``burst_seconds`` of unused budget may be spent at once after an idle spell.
    """

    def __init__(self, per_minute: float | None, burst_seconds: float = 1.0, clock: Clock = time.monotonic):
        self.clock = clock
        self.burst = burst_seconds
        self.per_minute: float | None = None
        self._interval = 0.0
        self._tat = clock() - burst_seconds  # theoretical arrival time of the next unit
        self.set_rate(per_minute)

    @property
    def limited(self) -> bool:
        return self.per_minute is not None

    def set_rate(self, per_minute: float | None) -> None:
        self.per_minute = per_minute if per_minute and per_minute > 0 else None
        self._interval = 60.0 / self.per_minute if self.per_minute else 0.0

    def reserve(self, amount: float = 1.0) -> float:
        if not self.per_minute:
            return 0.0
        now = self.clock()
        start = max(self._tat, now - self.burst)
        self._tat = start + amount * self._interval
        return max(0.0, start - now)

    def adjust(self, delta: float) -> None:
        """Correct a booked estimate once the real amount is known (``delta`` may be < 0)."""
        if self.per_minute:
            self._tat += delta * self._interval

    def pause_until(self, when: float) -> None:
        """Spend nothing before ``when`` (the upstream told us its budget is empty)."""
        self._tat = max(self._tat, when)


class ConcurrencyWindow:
    """A semaphore whose size moves: additive increase, multiplicative decrease.

    With ``initial`` below the maximum it starts in *slow start* (as TCP does): +1 per clean
    call, so it doubles every round trip until the first overload signal or the maximum. A
    first burst of ``maximum`` requests at an upstream whose limits we have not learned yet
    would mostly come back as 429s; a few requests first teach the lane the limits (from the
    ``x-ratelimit-*`` headers), at the cost of a few round trips."""

    def __init__(
        self, maximum: int, minimum: int = 1, initial: int | None = None, clock: Clock = time.monotonic
    ):
        self.maximum = maximum
        self.minimum = minimum
        self.limit = float(min(initial or maximum, maximum))
        self.slow_start = self.limit < maximum
        self.in_flight = 0
        self.clock = clock
        self._last_decrease = -math.inf
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def size(self) -> int:
        return max(self.minimum, int(self.limit))

    def try_acquire(self) -> bool:
        """Take a slot if one is free now, without waiting."""
        if self.in_flight < self.size and not self._waiters:
            self.in_flight += 1
            return True
        return False

    async def acquire(self) -> None:
        """Take a slot; no task, lock or timer on the fast path (this runs once per line)."""
        if self.in_flight < self.size and not self._waiters:
            self.in_flight += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed to us as we were cancelled: pass it on
            else:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        self.in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_flight < self.size:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.in_flight += 1
                waiter.set_result(None)

    def on_success(self) -> None:
        if self.limit < self.maximum:
            self.limit = min(float(self.maximum), self.limit + (1.0 if self.slow_start else 1.0 / self.limit))
            self._wake()

    def on_overload(self, cooldown: float = 1.0) -> None:
        """Halve, at most once per ``cooldown``: one burst of 429s is one signal, not many."""
        self.slow_start = False
        now = self.clock()
        if now - self._last_decrease >= cooldown:
            self.limit = max(float(self.minimum), self.limit / 2)
            self._last_decrease = now


class Health:
    """Up or down, from consecutive failures; probes with backoff while down."""

    def __init__(self, threshold: int = 5, max_probe_interval: float = 5.0, clock: Clock = time.monotonic):
        self.threshold = threshold
        self.max_probe_interval = max_probe_interval
        self.clock = clock
        self.failures = 0
        self.probe_interval = 0.25
        self.next_probe = 0.0
        self.probing = False

    @property
    def down(self) -> bool:
        return self.failures >= self.threshold

    def on_success(self) -> None:
        self.failures = 0
        self.probe_interval = 0.25
        self.probing = False

    def on_failure(self, retry_after: float | None = None) -> None:
        self.failures += 1
        self.probing = False
        if self.down:
            wait = retry_after if retry_after is not None else self.probe_interval
            self.next_probe = self.clock() + wait
            self.probe_interval = min(self.max_probe_interval, self.probe_interval * 2)

    def may_probe(self) -> bool:
        """While down, let exactly one request through once the probe time has come."""
        if self.probing or self.clock() < self.next_probe:
            return False
        self.probing = True
        return True

    def seconds_to_probe(self) -> float:
        return max(0.0, self.next_probe - self.clock())
