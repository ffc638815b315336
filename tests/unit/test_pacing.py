"""Pacing primitives and routing on a fake clock: budgets, AIMD, health, headers, weights."""

from __future__ import annotations

import asyncio

import pytest

from batchd.engine.lanes import SLOW_START, Lane, Router, UpstreamSpec, estimate_tokens, parse_reset
from batchd.engine.pacing import ConcurrencyWindow, Health, RateBudget
from batchd.upstreams.base import MockUpstream


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_budget_spaces_requests_evenly_after_a_small_burst() -> None:
    clock = Clock()
    budget = RateBudget(600, burst_seconds=1.0, clock=clock)  # 10/s
    waits = [budget.reserve() for _ in range(30)]
    assert waits[:10] == [0.0] * 10  # one second of burst
    assert waits[10:13] == pytest.approx([0.0, 0.1, 0.2])
    assert waits[29] == pytest.approx(1.9)
    clock.now += 60  # idle: credit is capped at the burst
    assert [budget.reserve() for _ in range(11)][-1] == pytest.approx(0.0)
    assert budget.reserve() == pytest.approx(0.1)


def test_rate_budget_sustained_rate_is_the_limit() -> None:
    clock = Clock()
    budget = RateBudget(1200, burst_seconds=0.5, clock=clock)
    sent = 0
    for _ in range(6000):  # a client that always goes when told
        clock.now += budget.reserve()
        sent += 1
    elapsed = clock.now - 1000.0
    assert sent / elapsed * 60 == pytest.approx(1200, rel=0.01)


def test_token_budget_reconciles_with_usage() -> None:
    clock = Clock()
    tokens = RateBudget(6000, burst_seconds=0, clock=clock)  # 100 tokens/s
    assert tokens.reserve(100) == 0.0
    assert tokens.reserve(100) == pytest.approx(1.0)
    tokens.adjust(-150)  # both calls used 25 tokens each, not 100
    assert tokens.reserve(10) == pytest.approx(0.5)
    unlimited = RateBudget(None, clock=clock)
    assert not unlimited.limited and unlimited.reserve(10**9) == 0.0


def test_window_aimd() -> None:
    clock = Clock()
    w = ConcurrencyWindow(64, clock=clock)
    assert w.size == 64
    w.on_overload()
    assert w.size == 32
    w.on_overload()  # same burst: ignored within the cooldown
    assert w.size == 32
    clock.now += 2
    w.on_overload()
    assert w.size == 16
    for _ in range(17):
        w.on_success()
    assert w.size == 17  # about +1 per window of clean calls
    for _ in range(10_000):
        w.on_success()
    assert w.size == 64  # capped
    for _ in range(20):
        clock.now += 2
        w.on_overload()
    assert w.size == 1


def test_window_slow_start_doubles_per_round_trip_until_overload() -> None:
    clock = Clock()
    w = ConcurrencyWindow(64, initial=4, clock=clock)
    assert w.size == 4
    for _ in range(4):  # one round trip of clean calls
        w.on_success()
    assert w.size == 8
    for _ in range(8):
        w.on_success()
    assert w.size == 16
    w.on_overload()  # the first overload ends slow start
    assert w.size == 8 and not w.slow_start
    for _ in range(9):
        w.on_success()
    assert w.size == 9  # back to about +1 per window
    full = ConcurrencyWindow(64, initial=4, clock=clock)
    for _ in range(1000):
        full.on_success()
    assert full.size == 64


def test_window_blocks_at_its_size() -> None:
    async def run() -> list[str]:
        w = ConcurrencyWindow(2)
        events: list[str] = []
        await w.acquire()
        await w.acquire()

        async def third() -> None:
            await w.acquire()
            events.append("third in")

        task = asyncio.create_task(third())
        await asyncio.sleep(0)
        events.append("released")
        w.release()
        await task
        return events

    assert asyncio.run(run()) == ["released", "third in"]


def test_health_goes_down_and_probes_one_at_a_time() -> None:
    clock = Clock()
    h = Health(threshold=3, clock=clock)
    for _ in range(2):
        h.on_failure()
    assert not h.down
    h.on_failure()
    assert h.down and not h.may_probe()
    clock.now += h.seconds_to_probe()
    assert h.may_probe() and not h.may_probe()  # exactly one probe
    h.on_failure(retry_after=7)
    assert h.seconds_to_probe() == pytest.approx(7)
    h.on_success()
    assert not h.down


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1.0), ("6m0s", 360.0), ("250ms", 0.25), ("1.5s", 1.5), ("2", 2.0), ("x", None)],
)
def test_parse_reset(text: str, seconds: float | None) -> None:
    assert parse_reset(text) == seconds


def _lane(**spec: object) -> Lane:
    return Lane(UpstreamSpec(name="u", url="http://x", **spec), "m", MockUpstream(None), Health())  # type: ignore[arg-type]


def test_lane_learns_limits_and_pauses_from_headers() -> None:
    async def run() -> Lane:
        lane = _lane()
        await lane.admit(0)
        headers = {
            "x-ratelimit-limit-requests": "600",
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "2s",
        }
        lane.finish(200, headers, 0, None, timed_out=False)
        return lane

    lane = asyncio.run(run())
    assert lane.rpm.per_minute == pytest.approx(600 * 0.98)
    assert lane.paused_until > 0


def test_lane_overload_halves_window_and_retry_after_pauses() -> None:
    async def run() -> Lane:
        lane = _lane(max_concurrency=8)
        await lane.admit(0)
        lane.finish(429, {"retry-after": "3"}, 0, None, timed_out=False)
        return lane

    lane = asyncio.run(run())
    assert lane.window.size == SLOW_START // 2 and lane.paused_until > 0 and not lane.health.down


def test_configured_limit_is_not_overridden_by_headers() -> None:
    async def run() -> Lane:
        lane = _lane(rpm=100)
        await lane.admit(0)
        lane.finish(200, {"x-ratelimit-limit-requests": "5000"}, 0, None, timed_out=False)
        return lane

    assert asyncio.run(run()).rpm.per_minute == pytest.approx(98)


def test_router_splits_by_weight_and_skips_down_upstreams() -> None:
    a = UpstreamSpec(name="a", url="http://a", weight=3)
    b = UpstreamSpec(name="b", url="http://b", weight=1)
    c = UpstreamSpec(name="c", url="http://c", models=("other",))
    router = Router([(a, MockUpstream(None)), (b, MockUpstream(None)), (c, MockUpstream(None))])  # type: ignore[arg-type]
    picks = [router.pick("m").spec.name for _ in range(400)]  # type: ignore[union-attr]
    assert picks.count("a") == 300 and picks.count("b") == 100 and "c" not in picks
    assert picks[:4].count("a") == 3  # smooth, not 300 a's then 100 b's
    for _ in range(5):
        router.health["a"].on_failure()
    assert {router.pick("m").spec.name for _ in range(20)} == {"b"}  # type: ignore[union-attr]
    router.health["b"].failures = 99
    assert router.pick("m") is not None  # all down: still picks (lanes wait for probes)
    assert router.capacity == 64 * 3


def test_estimate_tokens() -> None:
    assert estimate_tokens(400, 50) == 150


def test_workers_share_upstream_limits() -> None:
    spec = UpstreamSpec(name="u", url="http://x", rpm=1200)
    router = Router([(spec, MockUpstream(None))])  # type: ignore[arg-type]
    lane = router.lanes("m")[0]
    assert lane.rpm.per_minute == pytest.approx(1200 * 0.98)
    router.set_share(1 / 3)
    assert lane.rpm.per_minute == pytest.approx(400 * 0.98)
    later = router.lanes("other-model")[0]  # lanes made later get the share too
    assert later.rpm.per_minute == pytest.approx(400 * 0.98)
    router.set_share(1.0)
    assert lane.rpm.per_minute == pytest.approx(1200 * 0.98)


def test_a_line_waiting_on_a_downed_upstream_is_routed_again_when_another_is_up() -> None:
    a = UpstreamSpec(name="a", url="http://a")
    b = UpstreamSpec(name="b", url="http://b")
    router = Router([(a, MockUpstream(None)), (b, MockUpstream(None))])  # type: ignore[arg-type]
    lane_a, lane_b = router.lanes("m")
    for _ in range(5):
        router.health["a"].on_failure()
    router.health["a"].probing = True  # someone else holds the probe: a line would wait here

    async def run() -> tuple[bool, int]:
        admitted = await asyncio.wait_for(lane_a.admit(0, elsewhere=router.other_up), 5)
        return admitted, lane_a.window.in_flight

    assert asyncio.run(run()) == (False, 0)  # handed back, holding no slot
    assert router.other_up(lane_a) and not router.other_up(lane_b)


def test_fast_admission_only_when_nothing_could_make_a_line_wait() -> None:
    lane = _lane(max_concurrency=2)
    assert lane.try_admit(10) and lane.try_admit(10)
    assert not lane.try_admit(10)  # the window is full
    lane.finish(200, {}, 10, None, timed_out=False)
    assert lane.try_admit(10)
    assert not _lane(rpm=60).try_admit(0)  # a paced budget always takes the slow way
    assert _lane(tpm=1000).try_admit(0) and not _lane(tpm=1000).try_admit(5)
    paused = _lane()
    paused.paused_until = 1e18
    assert not paused.try_admit(0)
