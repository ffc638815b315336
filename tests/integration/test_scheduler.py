"""The fair scheduler end to end: a small batch created while a big one runs is not queued
behind it (per-batch cap, fair lease order)."""

from __future__ import annotations

from typing import Any

from batchd.testing.fake_upstream import FakeUpstreamHandle
from tests.support import jsonl, request_line, wait_terminal, wait_until


def test_small_batch_finishes_while_a_big_one_runs(
    make_server: Any, fake_upstream: FakeUpstreamHandle
) -> None:
    fake_upstream.configure(latency=0.02)
    server = make_server(fake_upstream.base_url, batchd_upstream_concurrency="8", batchd_chunk_lines="50")
    client = server.client()
    big_file = client.files.create(
        file=("big.jsonl", jsonl([request_line(f"big-{i}") for i in range(1500)])), purpose="batch"
    )
    big = client.batches.create(
        input_file_id=big_file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )

    def big_running() -> bool:
        b = client.batches.retrieve(big.id)
        return b.status == "in_progress" and b.request_counts is not None and b.request_counts.completed > 0

    wait_until(big_running, 60, what="the big batch to send its first lines")
    # Same project and a later deadline: earliest-deadline-first alone would queue it behind
    # every chunk of the big batch.
    small_file = client.files.create(
        file=("small.jsonl", jsonl([request_line(f"small-{i}") for i in range(10)])), purpose="batch"
    )
    small = client.batches.create(
        input_file_id=small_file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = wait_terminal(client, small.id, timeout=120)
    assert done.status == "completed" and done.request_counts.completed == 10
    big_now = client.batches.retrieve(big.id)
    assert big_now.status == "in_progress", "the small batch waited for the big one"
    assert big_now.request_counts is not None and big_now.request_counts.completed < 1500
    assert wait_terminal(client, big.id, timeout=120).status == "completed"
