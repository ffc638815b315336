"""What the dashboard shows, as one JSON document: batches, the error breakdown and the lanes.

Rates (lines/s) and the throughput chart are computed by the page from the progress deltas of
successive polls, so this module only reports counts. Error codes are counted from the error
parts' blobs: a part never changes once written, so each is read once and its counts are kept
(``ErrorCodeCounter``); one poll reads at most ``BYTES_PER_POLL`` of parts not seen before.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable
from typing import Any

import orjson

from batchd.blobs import BlobStore
from batchd.engine.lanes import Lane, Router
from batchd.engine.worker import Worker
from batchd.errors import BatchdError
from batchd.keys import Principal
from batchd.store import Store

BYTES_PER_POLL = 4 << 20
CACHED_PARTS = 20_000
NO_WORKER = (
    "lanes not in this process: this API server runs without a worker (serve --no-worker); "
    "each `batchd worker` process keeps its own lanes"
)
NOT_ADMIN = "upstream lanes are shown to admin keys only"


def line_code(line: bytes) -> str:
    """The error code of one error-file line: ``error.code`` (batch_expired, …), else the
    upstream's ``response.body.error.code``, else ``http_<status>``."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return "unreadable_line"
    if not isinstance(obj, dict):
        return "unreadable_line"
    err = obj.get("error")
    if isinstance(err, dict) and err.get("code"):
        return str(err["code"])
    resp = _dict(obj.get("response"))
    inner = _dict(_dict(resp.get("body")).get("error"))
    if inner.get("code"):
        return str(inner["code"])
    return f"http_{resp.get('status_code', 'unknown')}"


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


class ErrorCodeCounter:
    """Error-line counts by code for each error part, each part read once (parts are immutable)."""

    def __init__(self, max_parts: int = CACHED_PARTS):
        self.max_parts = max_parts
        self._parts: collections.OrderedDict[str, collections.Counter[str]] = collections.OrderedDict()

    async def _read(self, blobs: BlobStore, key: str, size: int) -> collections.Counter[str]:
        data = await blobs.get_range(key, 0, size)
        return collections.Counter(line_code(x) for x in data.splitlines() if x.strip())

    async def by_batch(
        self, blobs: BlobStore, parts: Iterable[tuple[str, str, int]], budget: int = BYTES_PER_POLL
    ) -> tuple[dict[str, collections.Counter[str]], bool]:
        """Counts per batch, and whether some parts were left for a later poll."""
        out: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        partial = False
        for batch_id, key, size in parts:
            counts = self._parts.get(key)
            if counts is None:
                if size > budget:
                    partial = True
                    continue
                try:
                    counts = await self._read(blobs, key, size)
                except BatchdError:  # purged while we looked: count what is left
                    continue
                budget -= size
                self._parts[key] = counts
                while len(self._parts) > self.max_parts:
                    self._parts.popitem(last=False)
            else:
                self._parts.move_to_end(key)
            out[batch_id].update(counts)
        return out, partial


def _validation_codes(row: dict[str, Any]) -> collections.Counter[str]:
    if not row.get("errors"):
        return collections.Counter()
    data = orjson.loads(row["errors"]).get("data") or []
    return collections.Counter(str(e.get("code") or "invalid_line") for e in data if isinstance(e, dict))


def batch_view(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "project": row["project"],
        "status": row["status"],
        "endpoint": row["endpoint"],
        "model": row["model"],
        "created_at": row["created_at"],
        "in_progress_at": row["in_progress_at"],
        "expires_at": row["expires_at"],
        "cancelling_at": row["cancelling_at"],
        "ended_at": row["completed_at"] or row["failed_at"] or row["expired_at"] or row["cancelled_at"],
        "request_counts": {"total": row["total"], "completed": row["completed"], "failed": row["failed"]},
    }


def _lane_view(lane: Lane, now: float) -> dict[str, Any]:
    return {
        "model": lane.model,
        "window": lane.window.size,
        "window_max": lane.window.maximum,
        "slow_start": lane.window.slow_start,
        "in_flight": lane.window.in_flight,
        "rpm_limit": lane.limits["requests"],
        "rpm_paced": lane.rpm.per_minute,
        "tpm_limit": lane.limits["tokens"],
        "tpm_paced": lane.tpm.per_minute,
        "paused_for": round(max(0.0, lane.paused_until - now), 3),
        "sent": lane.sent,
    }


def lanes_view(router: Router) -> list[dict[str, Any]]:
    """Every configured upstream with its health and the lanes it has opened so far (a lane
    opens on the first request for its model). No URLs or keys: names and numbers only."""
    now = time.monotonic()
    lanes = router.all_lanes()
    out = []
    for spec, _ in router.upstreams:
        health = router.health[spec.name]
        out.append(
            {
                "name": spec.name,
                "models": list(spec.models),
                "weight": spec.weight,
                "max_concurrency": spec.max_concurrency,
                "health": {
                    "up": not health.down,
                    "failures": health.failures,
                    "next_probe_in": round(health.seconds_to_probe(), 3) if health.down else None,
                },
                "lanes": [_lane_view(lane, now) for lane in lanes if lane.spec.name == spec.name],
            }
        )
    return out


def lanes_state(principal: Principal, worker: Worker | None) -> dict[str, Any]:
    if principal.key_id is not None and not principal.is_admin:
        return {"available": False, "reason": NOT_ADMIN, "share": None, "upstreams": []}
    if worker is None:
        return {"available": False, "reason": NO_WORKER, "share": None, "upstreams": []}
    router = worker.router
    return {"available": True, "reason": None, "share": router.share, "upstreams": lanes_view(router)}


async def build_state(
    store: Store,
    blobs: BlobStore,
    counter: ErrorCodeCounter,
    principal: Principal,
    worker: Worker | None,
    recent: int,
) -> dict[str, Any]:
    """The whole dashboard document. An admin key sees every project; any other key (and open
    mode) sees its own project only."""
    scope = None if principal.is_admin else principal.project
    rows = await store.dashboard_batches(scope, recent=recent)
    counts = await store.batch_status_counts(scope)
    failing = [r["id"] for r in rows if r["failed"] or r["status"] in ("cancelled", "expired")]
    codes, partial = await counter.by_batch(blobs, await store.error_parts(failing))
    for r in rows:
        if r["errors"]:
            codes.setdefault(r["id"], collections.Counter()).update(_validation_codes(r))
    by_code: collections.Counter[str] = collections.Counter()
    for c in codes.values():
        by_code.update(c)
    return {
        "object": "dashboard.state",
        "now": time.time(),
        "principal": {
            "project": principal.project,
            "is_admin": principal.is_admin,
            "open_mode": principal.key_id is None,
        },
        "status_counts": counts,
        "batches": [batch_view(r) for r in rows],
        "errors": {
            "by_batch": [
                {"id": r["id"], "failed": r["failed"], "codes": dict(codes[r["id"]].most_common())}
                for r in rows
                if r["failed"] or codes.get(r["id"])
            ],
            "by_code": dict(by_code.most_common()),
            "partial": partial,
        },
        "lanes": lanes_state(principal, worker),
    }
