"""Lanes and routing: where a request goes, and when it may go.

A lane is one (upstream, model) pair with its own budgets (requests/min, tokens/min), AIMD
concurrency window and pause; an upstream's health is shared by its lanes. The router spreads
a model's requests over the upstreams that serve it by weight (smooth weighted round-robin),
skipping upstreams that are down while any other is up.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from batchd.config import Settings
from batchd.engine.pacing import ConcurrencyWindow, Health, RateBudget
from batchd.engine.retry import parse_retry_after
from batchd.metrics import LaneMetrics
from batchd.upstreams.base import Upstream
from batchd.upstreams.http import HttpUpstream
from batchd.upstreams.reqwest import ReqwestUpstream

# Pace a little under a configured limit: the upstream's clock and ours drift, and arrivals
# jitter. 2% costs 2% of time and removes nearly every 429 at the limit.
SAFETY = 0.98
# A new lane's first window (see ``ConcurrencyWindow``): it doubles every round trip from here.
SLOW_START = 4
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class UpstreamSpec:
    """One upstream as configured (see ``config.UpstreamConfig``), key already resolved."""

    name: str
    url: str
    api_key: str | None = None
    models: tuple[str, ...] = ("*",)
    rpm: int | None = None
    tpm: int | None = None
    max_concurrency: int = 64
    weight: float = 1.0

    def serves(self, model: str) -> bool:
        return "*" in self.models or model in self.models


def parse_reset(value: str | None) -> float | None:
    """``x-ratelimit-reset-*`` values: ``1s``, ``6m0s``, ``250ms``, ``1.5s`` or plain seconds."""
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    total, pos = 0.0, 0
    for m in _DURATION.finditer(value):
        if m.start() != pos:
            return None
        total += float(m.group(1)) * _UNIT[m.group(2)]
        pos = m.end()
    return total if pos == len(value) and pos else None


def estimate_tokens(body_size: int, max_output: int) -> int:
    """Before the call: ~4 bytes of JSON per prompt token, plus the output the request allows.
    Reconciled with the response's ``usage`` afterwards."""
    return body_size // 4 + max_output


@dataclass
class Lane:
    spec: UpstreamSpec
    model: str
    client: Upstream
    health: Health
    rpm: RateBudget = field(init=False)
    tpm: RateBudget = field(init=False)
    window: ConcurrencyWindow = field(init=False)
    paused_until: float = 0.0
    sent: int = 0

    share: float = 1.0
    limits: dict[str, float | None] = field(init=False)
    metrics: LaneMetrics = field(init=False)

    def __post_init__(self) -> None:
        # The upstream's whole limits (configured, or learned from its headers); this worker
        # spends ``share`` of them, so a fleet of workers stays within them together.
        self.limits = {"requests": self.spec.rpm, "tokens": self.spec.tpm}
        self.rpm = RateBudget(None, burst_seconds=0.5)
        self.tpm = RateBudget(None, burst_seconds=0.5)
        self.window = ConcurrencyWindow(self.spec.max_concurrency, initial=SLOW_START)
        self.metrics = LaneMetrics(self.spec.name, self.model)
        self._apply()

    def set_share(self, share: float) -> None:
        if abs(share - self.share) > 1e-9:
            self.share = share
            self._apply()

    def _apply(self) -> None:
        for kind, budget in (("requests", self.rpm), ("tokens", self.tpm)):
            limit = self.limits[kind]
            budget.set_rate(limit * SAFETY * self.share if limit else None)

    def try_admit(self, tokens: int) -> bool:
        """Admit at once when nothing could make the request wait: no budget to pace, the
        upstream up, no pause, a free slot. Most lines of an unlimited lane go this way, with
        no timer or task; anything else takes ``admit``."""
        if (
            self.rpm.per_minute
            or (tokens and self.tpm.per_minute)
            or self.health.failures >= self.health.threshold
            or (self.paused_until and self.paused_until > time.monotonic())
            or not self.window.try_acquire()
        ):
            return False
        self.sent += 1
        return True

    async def admit(self, tokens: int, elsewhere: Callable[[Lane], bool] | None = None) -> bool:
        """Wait for a window slot, for the upstream to be up (or our turn to probe it), for a
        pause to end, and for the budgets; the slot is held until ``finish``. Returns False
        (holding nothing) when this upstream is down and ``elsewhere(self)`` says another one
        serving the model is up: the line should be routed again rather than wait here."""
        await self.window.acquire()
        try:
            while True:
                if self.health.down and not self.health.may_probe():
                    if elsewhere is not None and elsewhere(self):
                        self.window.release()
                        return False
                    await asyncio.sleep(min(max(self.health.seconds_to_probe(), 0.02), 0.5))
                    continue
                pause = self.paused_until - time.monotonic()
                if pause > 0:
                    await asyncio.sleep(pause)
                    continue
                break
            delay = max(self.rpm.reserve(1), self.tpm.reserve(tokens) if tokens else 0.0)
            if delay > 0:
                await asyncio.sleep(delay)
            self.sent += 1
        except BaseException:
            self.window.release()
            raise
        return True

    def abandon(self) -> None:
        """Admitted but not sent (the batch is stopping)."""
        self.window.release()

    def finish(
        self, status: int | None, headers: Mapping[str, str], tokens: int, used: int | None, timed_out: bool
    ) -> None:
        """Learn from one outcome: window, health, pauses, budgets."""
        self.window.release()
        self.metrics.attempt(status, timed_out)
        now = time.monotonic()
        if status is not None and status < 300:
            self.health.on_success()
            self.window.on_success()
            if len(headers) > 1 or "x-request-id" not in headers:  # more than the id: limits?
                self._learn(headers, now)
            if used is not None and tokens:
                self.tpm.adjust(used - tokens)
            return
        retry_after = parse_retry_after(headers, time.time())
        if retry_after is not None and status is not None and (status == 429 or status >= 500):
            self.paused_until = max(self.paused_until, now + retry_after)
        if status is None or status >= 500 or status == 408:
            self.health.on_failure(retry_after)
            if timed_out or status in (503, 504, 408):
                self.window.on_overload()
        elif status == 429:
            self.window.on_overload()
        else:
            self.health.on_success()
            self.window.on_success()
        self._learn(headers, now)
        if used is not None and tokens:
            self.tpm.adjust(used - tokens)

    def _learn(self, headers: Mapping[str, str], now: float) -> None:
        """Use ``x-ratelimit-*``: an exhausted budget pauses until its reset, and limits we
        were not told about are taken from the upstream."""
        for kind in ("requests", "tokens"):
            remaining = headers.get(f"x-ratelimit-remaining-{kind}")
            if remaining is not None and remaining.strip() in ("0", "0.0"):
                reset = parse_reset(headers.get(f"x-ratelimit-reset-{kind}"))
                if reset:
                    self.paused_until = max(self.paused_until, now + reset)
            limit = headers.get(f"x-ratelimit-limit-{kind}")
            configured = self.spec.rpm if kind == "requests" else self.spec.tpm
            if limit and configured is None:
                try:
                    learned = float(limit)
                except ValueError:
                    continue
                if learned > 0 and self.limits[kind] != learned:
                    self.limits[kind] = learned
                    self._apply()


class Router:
    """Picks a lane for each attempt: smooth weighted round-robin over healthy upstreams."""

    def __init__(self, upstreams: Sequence[tuple[UpstreamSpec, Upstream]]):
        self.upstreams = upstreams
        self.health = {spec.name: Health() for spec, _ in upstreams}
        self._lanes: dict[str, list[Lane]] = {}
        self._current: dict[tuple[str, str], float] = {}
        self.share = 1.0

    @property
    def capacity(self) -> int:
        """How many requests may be in flight at most, across all upstreams."""
        return sum(spec.max_concurrency for spec, _ in self.upstreams)

    def lanes(self, model: str) -> list[Lane]:
        lanes = self._lanes.get(model)
        if lanes is None:
            lanes = [
                Lane(spec, model, client, self.health[spec.name], share=self.share)
                for spec, client in self.upstreams
                if spec.serves(model)
            ]
            for lane in lanes:
                lane._apply()
            self._lanes[model] = lanes
        return lanes

    def set_share(self, share: float) -> None:
        """This worker's part of every upstream's limits (1/N with N active workers)."""
        self.share = share
        for lane in self.all_lanes():
            lane.set_share(share)

    def other_up(self, lane: Lane) -> bool:
        """Whether another upstream serving ``lane``'s model is up."""
        return any(
            other is not lane and not other.health.down for other in self._lanes.get(lane.model, ())
        )

    def all_lanes(self) -> list[Lane]:
        return [lane for lanes in self._lanes.values() for lane in lanes]

    def pick(self, model: str) -> Lane | None:
        lanes = self._lanes.get(model) or self.lanes(model)
        if len(lanes) == 1:
            return lanes[0]
        if not lanes:
            return None
        healthy = [lane for lane in lanes if not lane.health.down] or lanes
        total = sum(lane.spec.weight for lane in healthy)
        best: Lane | None = None
        for lane in healthy:
            key = (lane.spec.name, model)
            self._current[key] = self._current.get(key, 0.0) + lane.spec.weight
            if best is None or self._current[key] > self._current[(best.spec.name, model)]:
                best = lane
        assert best is not None
        self._current[(best.spec.name, model)] -= total
        return best

    async def aclose(self) -> None:
        for _, client in self.upstreams:
            await client.aclose()


def build_router(settings: Settings) -> Router:
    """One HTTP client per configured upstream, behind the router."""
    pairs: list[tuple[UpstreamSpec, Upstream]] = []
    for cfg in settings.upstreams():
        spec = UpstreamSpec(
            name=cfg.name,
            url=cfg.url.rstrip("/"),
            api_key=cfg.resolved_key(),
            models=tuple(cfg.models),
            rpm=cfg.rpm,
            tpm=cfg.tpm,
            max_concurrency=cfg.max_concurrency,
            weight=cfg.weight,
        )
        client = HttpUpstream if settings.upstream_client == "aiohttp" else ReqwestUpstream
        pairs.append((spec, client(spec.url, spec.api_key, spec.max_concurrency)))
    return Router(pairs)
