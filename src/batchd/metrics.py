"""Prometheus metrics: what every batchd process counts, and how it is rendered.

Three kinds, kept apart because they come from different places:

- **Process counters** (this module's ``Counter``/``Histogram`` objects in the default
  registry): lines finished, upstream requests by status, 429s, retries, validation
  throughput, API latency. Each process counts its own; Prometheus sums across processes.
- **Live engine state** (``EngineCollector``, read at scrape time from the workers of this
  process): lane concurrency windows, rate budgets, pauses, upstream health, the dispatch
  queue. Nothing is updated on the hot path for these.
- **Database state** (``DB_REGISTRY``, filled by the API's ``/metrics`` handler just before
  rendering): batches by status and the queue of unfinished chunks and lines. Every API
  process reports the same numbers (use ``max`` across instances), a ``batchd worker``
  reports none.

The hot path (one upstream attempt) costs one pre-bound ``Counter.inc``: children are bound
once per (lane, status) and kept in a dict, never looked up with ``.labels()`` per line.
Lines finished are counted per checkpoint, not per line.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from batchd.engine.worker import Worker

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# The ``*_created`` timestamp series double the output and no dashboard uses them.
disable_created_metrics()

# ---------------------------------------------------------------------------- lines, batches

LINES = Counter(
    "batchd_lines",
    "Lines with a durable result, by outcome: completed (output file), failed (an upstream "
    "HTTP error), error (no HTTP answer after all retries), expired and cancelled (never ran). "
    "rate() of it is the lines/s of this process.",
    ["outcome"],
)
LINES_COMPLETED = LINES.labels("completed")
LINES_FAILED = LINES.labels("failed")
LINES_ERROR = LINES.labels("error")
LINES_ENDED = {"batch_expired": LINES.labels("expired"), "batch_cancelled": LINES.labels("cancelled")}

BATCHES_FINISHED = Counter(
    "batchd_batches_finished", "Batches this process finalized, by terminal status.", ["status"]
)

# ------------------------------------------------------------------------------- validation

VALIDATED_BYTES = Counter("batchd_validated_bytes", "Input bytes read by validation.")
VALIDATED_LINES = Counter("batchd_validated_lines", "Request lines checked by validation.")

# --------------------------------------------------------------------------------- upstream

UPSTREAM_REQUESTS = Counter(
    "batchd_upstream_requests",
    "Upstream attempts by outcome: the HTTP status code, or 'timeout' / 'error' (no answer).",
    ["upstream", "model", "status"],
)
UPSTREAM_429 = Counter(
    "batchd_upstream_rate_limited", "Upstream answers with status 429.", ["upstream", "model"]
)
UPSTREAM_RETRIES = Counter(
    "batchd_upstream_retries",
    "Attempts that were retried, by what caused the retry (a status code, 'timeout' or 'error').",
    ["upstream", "model", "reason"],
)


class LaneMetrics:
    """The counters of one lane, with children bound on first use: one dict lookup and one
    ``inc`` per attempt."""

    __slots__ = ("upstream", "model", "_requests", "_retries", "_limited")

    def __init__(self, upstream: str, model: str):
        self.upstream, self.model = upstream, model
        self._requests: dict[int, Any] = {}
        self._retries: dict[str, Any] = {}
        self._limited = UPSTREAM_429.labels(upstream, model)

    def attempt(self, status: int | None, timed_out: bool) -> None:
        key = status if status is not None else (-1 if timed_out else 0)
        child = self._requests.get(key)
        if child is None:
            label = str(status) if status is not None else ("timeout" if timed_out else "error")
            child = self._requests[key] = UPSTREAM_REQUESTS.labels(self.upstream, self.model, label)
        child.inc()
        if status == 429:
            self._limited.inc()

    def retry(self, reason: str) -> None:
        child = self._retries.get(reason)
        if child is None:
            child = self._retries[reason] = UPSTREAM_RETRIES.labels(self.upstream, self.model, reason)
        child.inc()


# -------------------------------------------------------------------------------------- API

HTTP_SECONDS = Histogram(
    "batchd_http_request_duration_seconds",
    "API request latency (to the end of the response body), by route template.",
    ["method", "route", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)

# --------------------------------------------------------------------- live engine state


class EngineCollector(Collector):
    """Reads the lanes and queues of this process's workers when Prometheus scrapes."""

    def __init__(self) -> None:
        self.workers: weakref.WeakSet[Worker] = weakref.WeakSet()

    def collect(self) -> Iterable[Metric]:
        lane_gauges = {
            name: GaugeMetricFamily(f"batchd_lane_{name}", doc, labels=["upstream", "model"])
            for name, doc in (
                ("window", "The lane's AIMD concurrency window now (requests in flight allowed)."),
                ("window_max", "The most the lane's window may grow to (max_concurrency)."),
                ("in_flight", "Requests of the lane in flight now."),
                (
                    "rpm_budget",
                    "Requests/min this worker spends on the lane (share of the limit, "
                    "paced at 98%); 0 when unlimited.",
                ),
                ("tpm_budget", "Tokens/min this worker spends on the lane; 0 when unlimited."),
                ("rpm_limit", "The upstream's whole requests/min limit, configured or learned; 0 if none."),
                ("tpm_limit", "The upstream's whole tokens/min limit, configured or learned; 0 if none."),
                ("share", "This worker's share of the lane's limits (1/N with N active workers)."),
                ("paused_seconds", "Seconds left of a lane-wide pause (retry-after, exhausted budget)."),
            )
        }
        up = GaugeMetricFamily(
            "batchd_upstream_up", "1 while the upstream answers, 0 while down.", labels=["upstream"]
        )
        queue = GaugeMetricFamily(
            "batchd_worker_queued_lines", "Lines read from leased chunks, waiting for a sender."
        )
        running = GaugeMetricFamily("batchd_worker_chunks", "Chunks this process holds leases on.")
        parked = GaugeMetricFamily(
            "batchd_worker_backoff_lines", "Lines waiting out a retry delay (not holding a sender)."
        )
        now = time.monotonic()
        seen_up: set[str] = set()
        for worker in list(self.workers):
            queue.add_metric([], len(worker.queue))
            parked.add_metric([], len(worker.backoffs))
            running.add_metric([], len(worker.runs))
            for lane in worker.router.all_lanes():
                labels = [lane.spec.name, lane.model]
                for name, value in _lane_values(lane, now):
                    lane_gauges[name].add_metric(labels, value)
            for name, health in worker.router.health.items():
                if name not in seen_up:
                    seen_up.add(name)
                    up.add_metric([name], 0.0 if health.down else 1.0)
        yield from lane_gauges.values()
        yield from (up, queue, running, parked)


def _lane_values(lane: Any, now: float) -> Iterator[tuple[str, float]]:
    yield "window", float(lane.window.size)
    yield "window_max", float(lane.window.maximum)
    yield "in_flight", float(lane.window.in_flight)
    yield "rpm_budget", float(lane.rpm.per_minute or 0.0)
    yield "tpm_budget", float(lane.tpm.per_minute or 0.0)
    yield "rpm_limit", float(lane.limits.get("requests") or 0.0)
    yield "tpm_limit", float(lane.limits.get("tokens") or 0.0)
    yield "share", float(lane.share)
    yield "paused_seconds", max(0.0, lane.paused_until - now)


ENGINE = EngineCollector()
REGISTRY.register(ENGINE)


def watch_worker(worker: Worker) -> None:
    """Report this worker's lanes and queue on this process's metrics."""
    ENGINE.workers.add(worker)


# --------------------------------------------------------------------------- database state

DB_REGISTRY = CollectorRegistry(auto_describe=True)
BATCH_STATUSES = (
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
)
BATCHES = Gauge("batchd_batches", "Batches in the database, by status.", ["status"], registry=DB_REGISTRY)
BATCHES_PAUSED = Gauge(
    "batchd_batches_paused",
    "Active batches that are paused (their status stays in_progress).",
    registry=DB_REGISTRY,
)
QUEUE_CHUNKS = Gauge(
    "batchd_queue_chunks",
    "Unfinished chunks of active batches, by state: pending (waiting for a worker) or leased.",
    ["state"],
    registry=DB_REGISTRY,
)
QUEUE_LINES = Gauge(
    "batchd_queue_lines", "Lines of active batches without a result yet.", registry=DB_REGISTRY
)


def set_db_state(snapshot: dict[str, Any]) -> None:
    """Fill the database gauges from ``Store.metrics_snapshot()``."""
    by_status = snapshot["batches"]
    for status in BATCH_STATUSES:
        BATCHES.labels(status).set(by_status.get(status, 0))
    BATCHES_PAUSED.set(snapshot["paused"])
    for state in ("pending", "leased"):
        QUEUE_CHUNKS.labels(state).set(snapshot["chunks"].get(state, 0))
    QUEUE_LINES.set(snapshot["lines"])


def render(with_db: bool) -> bytes:
    """The text exposition of this process (and of the database gauges when asked)."""
    text = generate_latest(REGISTRY)
    return text + generate_latest(DB_REGISTRY) if with_db else text


@contextlib.asynccontextmanager
async def serve_metrics(host: str, port: int) -> AsyncIterator[None]:
    """``batchd worker --metrics-port``: a tiny HTTP server with ``GET /metrics`` (this
    process's counters and engine state; no database gauges, no auth: bind it privately)."""
    from aiohttp import web  # here, not at import: every server would pay ~0.1 s for it

    async def handle(_: web.Request) -> web.Response:
        return web.Response(body=render(with_db=False), headers={"content-type": CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/metrics", handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        yield
    finally:
        await runner.cleanup()
