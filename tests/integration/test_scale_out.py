"""Many processes on PostgreSQL + S3: API-only servers, worker-only processes, a worker killed.

With the durable window (``BATCHD_DURABLE_WINDOW``, on by default with PostgreSQL) a sender
keeps its slot until its line's result is in a committed part, so a worker never has more than
``upstream_concurrency`` lines sent but not durable in shared storage: that is what the fleet
counts as the worker's requests in flight, and all that another worker may send again when it
dies. The tests assert repeats against that cap (the exact number in flight at the kill is not
observable from outside the killed process).
"""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from batchd.testing.fake_upstream import FakeUpstreamHandle
from tests.support import jsonl, read_results, request_line, wait_terminal, wait_until

WORKER_CONCURRENCY = 64  # the default


def _exactly_once(client: Any, done: Any, n: int) -> None:
    assert done.status == "completed" and done.request_counts.completed == n, done
    out, err = read_results(client, done)
    assert err == []
    seen = Counter(o["custom_id"] for o in out)
    assert len(seen) == n and max(seen.values()) == 1


@pytest.mark.backends("pg")  # several machines share PostgreSQL and S3; SQLite is one machine
def test_two_apis_three_workers_one_killed(make_server: Any, fake_upstream: FakeUpstreamHandle) -> None:
    fake_upstream.configure(latency=0.01)
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
    _exactly_once(first, done, n)
    # The dead worker's answered results that were not yet in shared storage held their
    # sender slots, so what is repeated is at most its concurrency (its journal is local).
    repeated = fake_upstream.stats()["repeated_bodies"]
    assert repeated <= WORKER_CONCURRENCY, repeated


def test_takeover_by_another_worker_repeats_at_most_the_window(
    make_server: Any, fake_upstream: FakeUpstreamHandle, backend: dict[str, str], tmp_path: Path
) -> None:
    """A worker killed and replaced by a worker with another identity (another machine): the
    new one waits for the lease to run out, takes the chunks over and never reads the dead
    one's journal, yet sends again no more than the dead one's concurrency. On SQLite too,
    with the window switched on and the database and blobs shared by path."""
    fake_upstream.configure(latency=0.01)
    common = {
        "batchd_lease_seconds": "2",
        "batchd_chunk_lines": "500",
        "batchd_durable_window": "on",
        "batchd_upstream_concurrency": str(WORKER_CONCURRENCY),
    }
    if backend["BATCHD_TEST_BACKEND"] == "sqlite":
        common["batchd_database_url"] = f"sqlite+aiosqlite:///{tmp_path / 'shared.sqlite3'}"
        common["batchd_storage_url"] = f"file://{tmp_path / 'blobs'}"
    api = make_server(fake_upstream.base_url, name="api", batchd_run_worker="false", **common)
    dying = make_server(fake_upstream.base_url, name="w1", command="worker", **common)
    n = 3000
    client = api.client()
    f = client.files.create(
        file=("takeover.jsonl", jsonl([request_line(i) for i in range(n)])), purpose="batch"
    )
    batch = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    wait_until(
        lambda: client.batches.retrieve(batch.id).request_counts.completed >= n // 3, 60, what="progress"
    )
    dying.stop(signal.SIGKILL)
    make_server(fake_upstream.base_url, name="w2", command="worker", **common)
    done = wait_terminal(client, batch.id, timeout=120)
    _exactly_once(client, done, n)
    repeated = fake_upstream.stats()["repeated_bodies"]
    assert repeated <= WORKER_CONCURRENCY, repeated
