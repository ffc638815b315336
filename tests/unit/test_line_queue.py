"""The sender queue: bounded for feeders that refill in bursts, a front door for retries."""

from __future__ import annotations

import asyncio

from batchd.engine.line_queue import LineQueue


def test_feeder_wakes_once_per_half_queue_and_retries_jump_the_line() -> None:
    async def run() -> tuple[list[int], int]:
        q: LineQueue[int] = LineQueue(8)
        wakes = 0

        async def feeder() -> None:
            nonlocal wakes
            for i in range(40):
                before = len(q)
                await q.put(i)
                if before >= q.high:
                    wakes += 1

        task = asyncio.create_task(feeder())
        await asyncio.sleep(0)
        assert len(q) == 8  # filled to the bound, then blocked
        got = [await q.get() for _ in range(3)]
        q.put_front(100)  # a retry: past the bound, next out
        got.append(await q.get())
        while len(got) < 41:
            got.append(await q.get())
            await asyncio.sleep(0)
        await task
        return got, wakes

    got, wakes = asyncio.run(run())
    assert got[:4] == [0, 1, 2, 100]
    assert sorted(got) == [*range(40), 100] and got[4:] == [i for i in range(3, 40)]
    assert wakes <= 40 // 4  # not once per line


def test_getter_waits_for_a_line_and_cancelled_getters_lose_nothing() -> None:
    async def run() -> list[int]:
        q: LineQueue[int] = LineQueue(4)
        waiting = asyncio.create_task(q.get())
        cancelled = asyncio.create_task(q.get())
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.sleep(0)
        await q.put(1)
        await q.put(2)
        return [await waiting, await q.get()]

    assert asyncio.run(run()) == [1, 2]
