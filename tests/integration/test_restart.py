"""Stopping the server mid-run and starting it again: the batch resumes and ends exactly once."""

from __future__ import annotations

import signal
from collections import Counter
from typing import Any

from batchd.testing.fake_upstream import FakeUpstreamHandle
from tests.support import jsonl, read_results, request_line, wait_terminal, wait_until


def test_sigterm_mid_run_then_restart_resumes_without_repeats(
    make_server: Any, fake_upstream: FakeUpstreamHandle
) -> None:
    fake_upstream.configure(latency=0.02)
    env = {"batchd_upstream_concurrency": "8", "batchd_chunk_lines": "50"}
    first = make_server(fake_upstream.base_url, name="data", **env)
    client = first.client()
    lines = [request_line(i) for i in range(1500)]
    f = client.files.create(file=("big.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    wait_until(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 200, 60, what="progress")
    assert first.stop(signal.SIGTERM) == 0, first.log()
    sent_before = fake_upstream.stats()["requests"]
    assert sent_before < 1500

    second = make_server(fake_upstream.base_url, name="data", **env)
    client = second.client()
    done = wait_terminal(client, batch.id, timeout=120)
    assert done.status == "completed" and done.request_counts.completed == 1500
    out, err = read_results(client, done)
    assert err == []
    seen = Counter(o["custom_id"] for o in out)
    assert len(seen) == 1500 and max(seen.values()) == 1
    stats = fake_upstream.stats()
    assert stats["repeated_bodies"] == 0, "a graceful stop must not cause a single repeated request"
    assert stats["requests"] == 1500
