"""``GET /metrics``: parsed with Prometheus's own text parser; values that move with real work."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx2 as httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from batchd.testing.fake_upstream import FakeUpstreamHandle
from tests.integration.test_tenancy import new_key_in_process
from tests.support import Server, free_port, jsonl, request_line, wait_terminal, wait_until

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
MODEL = {"upstream": "default", "model": "fake-model"}


def scrape(url: str, key: str | None = None) -> Samples:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    r = httpx.get(url, headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def metrics_url(server: Server) -> str:
    return server.base_url.removesuffix("/v1") + "/metrics"


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_move_with_batches(server: Server, fake_upstream: FakeUpstreamHandle) -> None:
    """One server: a batch's lines and requests, then 429s, then access once keys exist."""
    lines_requests_and_latency(server, fake_upstream)
    rate_limits_show_as_429s_and_retries(server, fake_upstream)
    metrics_need_an_admin_key_once_keys_exist(server)


def lines_requests_and_latency(server: Server, fake_upstream: FakeUpstreamHandle) -> None:
    client = server.client()
    before = scrape(metrics_url(server))
    lines = [
        request_line(i, **({"fake_status": 400} if i % 5 == 0 else {"fake_fail_times": 1} if i == 3 else {}))
        for i in range(20)
    ]
    data = jsonl(lines)
    f = client.files.create(file=("m.jsonl", data), purpose="batch")
    batch = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = wait_terminal(client, batch.id)
    assert done.status == "completed" and done.request_counts.failed == 4
    after = scrape(metrics_url(server))

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("batchd_lines_total", outcome="completed") == 16
    assert moved("batchd_lines_total", outcome="failed") == 4
    assert moved("batchd_batches_finished_total", status="completed") == 1
    assert value(after, "batchd_batches", status="completed") == 1
    assert value(after, "batchd_batches", status="in_progress") == 0
    assert value(after, "batchd_queue_lines") == 0
    assert moved("batchd_validated_lines_total") == 20
    assert moved("batchd_validated_bytes_total") == len(data)
    assert moved("batchd_upstream_requests_total", **MODEL, status="200") == 16
    assert moved("batchd_upstream_requests_total", **MODEL, status="400") == 4
    assert moved("batchd_upstream_requests_total", **MODEL, status="500") == 1
    assert moved("batchd_upstream_retries_total", **MODEL, reason="500") == 1
    assert fake_upstream.stats()["requests"] == 21
    assert value(after, "batchd_lane_window", **MODEL) >= 1
    assert value(after, "batchd_lane_window_max", **MODEL) == 64
    assert value(after, "batchd_lane_share", **MODEL) == 1
    assert value(after, "batchd_upstream_up", upstream="default") == 1

    # The latency histogram counts requests by route template, never by raw path.
    route = {"method": "GET", "route": "/v1/batches/{batch_id}", "status": "200"}
    for _ in range(3):
        client.batches.retrieve(batch.id)
    again = scrape(metrics_url(server))
    count = "batchd_http_request_duration_seconds_count"
    assert value(again, count, **route) - value(after, count, **route) == 3
    assert value(again, "batchd_http_request_duration_seconds_bucket", **route, le="+Inf") == value(
        again, count, **route
    )
    routes = {dict(labels).get("route") for (name, labels) in again if name == count}
    assert "/v1/files" in routes and not any(batch.id in str(r) for r in routes)


def rate_limits_show_as_429s_and_retries(server: Server, fake_upstream: FakeUpstreamHandle) -> None:
    before = scrape(metrics_url(server))
    fake_upstream.reset_stats()
    fake_upstream.configure(max_concurrency=1, latency=0.05)
    client = server.client()
    f = client.files.create(file=("r.jsonl", jsonl([request_line(i) for i in range(3)])), purpose="batch")
    batch = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = wait_terminal(client, batch.id, timeout=90)
    assert done.status == "completed" and done.request_counts.completed == 3
    got = scrape(metrics_url(server))

    def moved(name: str, **labels: str) -> float:
        return value(got, name, **labels) - value(before, name, **labels)

    rejected = fake_upstream.stats()["by_status"].get(429, 0)
    assert rejected > 0
    assert moved("batchd_upstream_rate_limited_total", **MODEL) == rejected
    assert moved("batchd_upstream_requests_total", **MODEL, status="429") == rejected
    assert moved("batchd_upstream_retries_total", **MODEL, reason="429") == rejected
    assert moved("batchd_upstream_requests_total", **MODEL, status="200") == 3


def metrics_need_an_admin_key_once_keys_exist(server: Server) -> None:
    url = metrics_url(server)
    assert httpx.get(url, timeout=10).status_code == 200  # open mode, loopback
    member = new_key_in_process(server, "alpha")
    admin = new_key_in_process(server, "ops", admin=True)
    wait_until(lambda: httpx.get(url, timeout=10).status_code == 401, 5, what="keys to apply")
    r = httpx.get(url, headers={"authorization": f"Bearer {member}"}, timeout=10)
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_key_required"
    assert value(scrape(url, admin), "batchd_batches", status="completed") == 2


@pytest.mark.backends("sqlite")  # a process option; the back end adds nothing here
def test_separate_worker_serves_its_own_metrics(
    make_server: Callable[..., Server], fake_upstream: FakeUpstreamHandle
) -> None:
    api = make_server(fake_upstream.base_url, batchd_run_worker="false")
    port = free_port()
    make_server(fake_upstream.base_url, command="worker", batchd_metrics_port=str(port))
    client = api.client()
    f = client.files.create(file=("w.jsonl", jsonl([request_line(i) for i in range(6)])), purpose="batch")
    batch = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert wait_terminal(client, batch.id).status == "completed"
    worker: Any = scrape(f"http://127.0.0.1:{port}/metrics")
    assert value(worker, "batchd_lines_total", outcome="completed") == 6
    assert value(worker, "batchd_validated_lines_total") == 6
    assert not any(name == "batchd_batches" for name, _ in worker)  # database gauges: the API's
    served = scrape(metrics_url(api))
    assert value(served, "batchd_lines_total", outcome="completed") == 0  # no worker in the API
    assert value(served, "batchd_batches", status="completed") == 1
