"""Many processes on PostgreSQL + S3: API-only servers, worker-only processes, a worker killed."""

from __future__ import annotations

import signal
from collections import Counter
from typing import Any

import pytest

from batchd.testing.fake_upstream import FakeUpstreamHandle
from tests.support import jsonl, read_results, request_line, wait_terminal, wait_until

WORKER_CONCURRENCY = 16


def test_two_apis_three_workers_one_killed(
    make_server: Any, fake_upstream: FakeUpstreamHandle, backend: dict[str, str]
) -> None:
    if backend["BATCHD_TEST_BACKEND"] != "pg":
        pytest.skip("several machines share PostgreSQL and S3; SQLite + a local directory is one machine")
    fake_upstream.configure(latency=0.02)
    common = {"batchd_lease_seconds": "3", "batchd_chunk_lines": "500"}
    apis = [
        make_server(fake_upstream.base_url, name=f"api{i}", batchd_run_worker="false", **common)
        for i in (1, 2)
    ]
    workers = [
        make_server(
            fake_upstream.base_url,
            name=f"worker{i}",
            command="worker",
            batchd_upstream_concurrency=str(WORKER_CONCURRENCY),
            **common,
        )
        for i in (1, 2, 3)
    ]
    n = 20_000
    lines = [request_line(i) for i in range(n)]
    first, second = apis[0].client(), apis[1].client()
    f = first.files.create(file=("scale.jsonl", jsonl(lines)), purpose="batch")
    batch = second.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    wait_until(
        lambda: first.batches.retrieve(batch.id).request_counts.completed >= n // 4, 120, what="progress"
    )
    workers[0].stop(signal.SIGKILL)
    done = wait_terminal(second, batch.id, timeout=240)
    assert done.status == "completed" and done.request_counts.completed == n
    out, err = read_results(first, done)
    assert err == []
    seen = Counter(o["custom_id"] for o in out)
    assert len(seen) == n and max(seen.values()) == 1
    # Only what the dead worker had in flight may be sent again; its answered results are in its
    # (local) journal, which no one else reads, so its uncommitted answers are repeated too:
    # at most one checkpoint's worth per chunk it held, on top of its in-flight requests.
    repeated = fake_upstream.stats()["repeated_bodies"]
    assert repeated <= WORKER_CONCURRENCY + 2 * 500, repeated
