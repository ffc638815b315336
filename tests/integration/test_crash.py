"""kill -9 at any moment loses nothing and duplicates nothing.

A 20,000-line batch runs against FakeUpstream with latency while the server is SIGKILLed at ten
moments (during validation, at random points of dispatch, and as the last lines land, when
finalization starts) and restarted on the same data directory each time.
"""

from __future__ import annotations

import random
import signal
import time
from collections import Counter
from typing import Any

from batchd.testing import expected_content
from batchd.testing.fake_upstream import FakeUpstreamHandle
from tests.support import jsonl, read_results, request_line, wait_terminal, wait_until

CONCURRENCY = 48
ENV = {"batchd_upstream_concurrency": str(CONCURRENCY), "batchd_chunk_lines": "500"}


def _check_exactly_once(
    lines: list[dict[str, Any]], out: list[dict[str, Any]], err: list[dict[str, Any]]
) -> None:
    seen = Counter(x["custom_id"] for x in out + err)
    assert len(seen) == len(lines), f"{len(lines) - len(seen)} custom_ids missing"
    assert max(seen.values()) == 1, [k for k, v in seen.items() if v > 1][:5]


def _wait_completed(client: Any, batch_id: str, target: int) -> None:
    wait_until(
        lambda: client.batches.retrieve(batch_id).request_counts.completed >= target,
        120,
        what=f"{target} lines",
    )


def test_sigkill_at_ten_moments(make_server: Any, fake_upstream: FakeUpstreamHandle) -> None:
    fake_upstream.configure(latency=0.02)
    n = 20_000
    lines = [request_line(i) for i in range(n)]
    server = make_server(fake_upstream.base_url, name="data", **ENV)
    client = server.client()
    f = client.files.create(file=("crash.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )

    rng = random.Random(20261123)
    targets = sorted(rng.randint(n // 20, n * 19 // 20) for _ in range(8))
    moments: list[Any] = ["validating", *targets, "last-lines"]
    kills = 0
    for moment in moments:
        if moment != "validating":
            target = n - 300 if moment == "last-lines" else moment
            _wait_completed(client, batch.id, target)
        server.stop(signal.SIGKILL)
        kills += 1
        server = make_server(fake_upstream.base_url, name="data", **ENV)
        client = server.client()

    done = wait_terminal(client, batch.id, timeout=180)
    assert done.status == "completed", done
    assert done.request_counts.completed == n and done.request_counts.failed == 0
    out, err = read_results(client, done)
    _check_exactly_once(lines, out, err)
    assert err == []
    by_id = {x["custom_id"]: x for x in lines}
    for o in out:
        content = o["response"]["body"]["choices"][0]["message"]["content"]
        assert content == expected_content(by_id[o["custom_id"]]["body"], "/v1/chat/completions")
    stats = fake_upstream.stats()
    # Only requests still waiting for their answer at a kill may be sent twice; answered ones
    # are in the journal. At most CONCURRENCY are in flight at any moment.
    assert stats["repeated_bodies"] <= kills * CONCURRENCY, stats
    assert stats["requests"] - stats["repeated_bodies"] >= n


def test_sigkill_during_cancel_ends_cancelled(make_server: Any, fake_upstream: FakeUpstreamHandle) -> None:
    fake_upstream.configure(latency=0.05)
    env = {"batchd_upstream_concurrency": "8", "batchd_chunk_lines": "50"}
    server = make_server(fake_upstream.base_url, name="data", **env)
    client = server.client()
    lines = [request_line(i) for i in range(2000)]
    f = client.files.create(file=("c.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    wait_until(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 100, 60, what="progress")
    assert client.batches.cancel(batch.id).status == "cancelling"
    server.stop(signal.SIGKILL)
    server = make_server(fake_upstream.base_url, name="data", **env)
    client = server.client()
    done = wait_terminal(client, batch.id)
    assert done.status == "cancelled" and done.request_counts.completed >= 100
    out, err = read_results(client, done)
    _check_exactly_once(lines, out, err)
    assert len(out) == done.request_counts.completed
    assert {e["error"]["code"] for e in err} == {"batch_cancelled"}


def test_sigkill_then_downtime_past_expiry_ends_expired(
    make_server: Any, fake_upstream: FakeUpstreamHandle
) -> None:
    fake_upstream.configure(latency=0.05)
    env = {
        "batchd_upstream_concurrency": "4",
        "batchd_chunk_lines": "20",
        "batchd_completion_windows": "24h,4s",
    }
    server = make_server(fake_upstream.base_url, name="data", **env)
    client = server.client()
    lines = [request_line(i) for i in range(1000)]
    f = client.files.create(file=("e.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="4s")  # type: ignore[arg-type]
    wait_until(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 20, 30, what="progress")
    server.stop(signal.SIGKILL)
    # Stay down until the deadline has passed: expiry is judged by the wall clock.
    wait_until(lambda: time.time() > batch.expires_at + 1, 10, what="the deadline to pass")
    server = make_server(fake_upstream.base_url, name="data", **env)
    client = server.client()
    done = wait_terminal(client, batch.id)
    assert done.status == "expired" and done.request_counts.completed >= 20
    out, err = read_results(client, done)
    _check_exactly_once(lines, out, err)
    assert {e["error"]["code"] for e in err} == {"batch_expired"}
