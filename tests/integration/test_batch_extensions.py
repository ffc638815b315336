"""Extensions beyond OpenAI's Batch API: partial results, pause/resume, rerun, eta and
lines_per_second; each through the real server with the official SDK."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx2 as httpx
import openai
import pytest
from openai.types import Batch

from batchd.testing.fake_upstream import FakeUpstreamHandle
from tests.integration.test_metrics import metrics_url, scrape, value
from tests.integration.test_tenancy import new_key_in_process
from tests.support import Server, assert_schema, jsonl, read_results, request_line, wait_terminal, wait_until


def submit(client: openai.OpenAI, lines: list[Any], **kw: Any) -> Batch:
    f = client.files.create(file=("batch.jsonl", jsonl(lines)), purpose="batch")
    return client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h", **kw
    )


def results(client: openai.OpenAI, batch_id: str, stream: str = "output") -> tuple[bytes, str]:
    """The results extension through the SDK (same auth and contract hook): body, status."""
    r = client.get(
        f"/batches/{batch_id}/results", options={"params": {"stream": stream}}, cast_to=httpx.Response
    )
    assert int(r.headers["content-length"]) == len(r.content)
    return r.content, r.headers["x-batch-status"]


def lines_of(body: bytes) -> list[dict[str, Any]]:
    out = [json.loads(x) for x in body.splitlines()]
    for line in out:
        assert_schema("BatchRequestOutput", line)
    return out


def action(client: openai.OpenAI, batch_id: str, verb: str, body: Any = None) -> Batch:
    return client.post(f"/batches/{batch_id}/{verb}", body=body, cast_to=Batch)


def extra(batch: Batch) -> dict[str, Any]:
    return batch.model_extra or {}


def test_results_rerun_and_scoping(server: Server, fake_upstream: FakeUpstreamHandle) -> None:
    """One server for three stories (a server start costs more than each story)."""
    partial_results_while_running(server, fake_upstream)
    rerun_makes_a_batch_of_the_failed_lines(server)
    extensions_are_scoped_to_the_project(server)


def partial_results_while_running(server: Server, fake_upstream: FakeUpstreamHandle) -> None:
    fake_upstream.configure(hold=True)
    client = server.client()
    lines = [
        request_line(i, **({"fake_hold": True} if i >= 10 else {"fake_status": 400} if i == 0 else {}))
        for i in range(20)
    ]
    batch = submit(client, lines)
    try:
        wait_until(lambda: fake_upstream.stats()["held"] == 10, 30, what="10 requests held")

        def nine_lines() -> tuple[bytes, str] | None:
            got = results(client, batch.id)
            return got if len(got[0].splitlines()) == 9 else None

        body, status = wait_until(nine_lines, 30, what="9 checkpointed output lines")
        assert status == "in_progress"
        partial = lines_of(body)
        assert sorted(o["custom_id"] for o in partial) == sorted(f"req-{i}" for i in range(1, 10))
        assert all(o["response"]["status_code"] == 200 for o in partial)
        errors = wait_until(
            lambda: lines_of(results(client, batch.id, "errors")[0]) or None, 30, what="the error line"
        )
        assert [e["custom_id"] for e in errors] == ["req-0"]
        running = client.batches.retrieve(batch.id)
        assert running.status == "in_progress" and running.output_file_id is None
        ext = extra(running)
        assert ext["paused"] is False and ext["paused_at"] is None
        assert ext["lines_per_second"] > 0
        assert ext["eta"] is not None and ext["eta"] >= int(time.time())
    finally:
        fake_upstream.configure(hold=False)
    done = wait_terminal(client, batch.id)
    assert done.status == "completed" and done.request_counts.completed == 19
    assert extra(done)["eta"] is None and extra(done)["lines_per_second"] is None
    body, status = results(client, done.id)
    assert status == "completed"
    assert body == client.files.content(done.output_file_id).content
    assert results(client, done.id, "errors")[0] == client.files.content(done.error_file_id).content
    with pytest.raises(openai.BadRequestError) as exc:
        results(client, done.id, "everything")
    assert exc.value.param == "stream"


def test_pause_resume_and_expiry_while_paused(
    make_server: Callable[..., Server], fake_upstream: FakeUpstreamHandle
) -> None:
    fake_upstream.configure(hold=True)
    server = make_server(
        fake_upstream.base_url,
        batchd_upstream_concurrency="2",
        batchd_chunk_lines="5",
        batchd_completion_windows="24h,3s",
    )
    client = server.client()
    # A batch paused at once, with a 3 s window: its deadline keeps running while paused. Its
    # lines take longer than the window, so none can finish even if sent before the pause landed.
    slow = [request_line(f"s{i}", fake_latency=4) for i in range(5)]
    short = client.files.create(file=("p.jsonl", jsonl(slow)), purpose="batch")
    expiring = client.batches.create(
        input_file_id=short.id,
        endpoint="/v1/chat/completions",
        completion_window="3s",  # type: ignore[arg-type]
    )
    paused_early = action(client, expiring.id, "pause")
    assert extra(paused_early)["paused"] is True
    lines = [request_line(i, **({"fake_hold": True} if i >= 10 else {})) for i in range(40)]
    batch = submit(client, lines)
    try:
        wait_until(lambda: fake_upstream.stats()["held"] == 2, 30, what="2 requests held")
        paused = action(client, batch.id, "pause")
        assert paused.status == "in_progress"  # the status enum is OpenAI's: pause is a flag
        assert extra(paused)["paused"] is True and extra(paused)["paused_at"] >= paused.created_at
        assert extra(action(client, batch.id, "pause"))["paused_at"] == extra(paused)["paused_at"]
    finally:
        fake_upstream.configure(hold=False)  # the two in-flight requests finish
    url = metrics_url(server)

    def settled() -> bool:
        got = scrape(url)
        idle = fake_upstream.stats()["in_flight"] == 0
        return (
            idle
            and value(got, "batchd_queue_chunks", state="leased") == 0
            and value(got, "batchd_worker_chunks") == 0
        )

    wait_until(settled, 30, what="the worker to give the paused batch's chunks back")
    seen = client.batches.retrieve(batch.id)
    sent = fake_upstream.stats()["requests"]
    assert 2 <= seen.request_counts.completed < 40  # at least the two held requests
    assert extra(seen)["paused"] is True and extra(seen)["lines_per_second"] == 0
    assert extra(seen)["eta"] is None
    with pytest.raises(openai.BadRequestError) as exc:
        action(client, batch.id, "rerun")
    assert exc.value.code == "batch_not_rerunnable"
    for _ in range(10):  # no progress across several checkpoint intervals (0.1 s) and polls (0.05 s)
        time.sleep(0.1)
        now = client.batches.retrieve(batch.id)
        assert now.request_counts == seen.request_counts and now.status == "in_progress"
        assert fake_upstream.stats()["requests"] == sent
    assert value(scrape(url), "batchd_batches_paused") >= 1  # (the 3 s batch may have expired)
    resumed = action(client, batch.id, "resume")
    assert extra(resumed)["paused"] is False and extra(resumed)["paused_at"] is None
    done = wait_terminal(client, batch.id)
    assert done.status == "completed" and done.request_counts.completed == 40
    out, err = read_results(client, done)
    assert err == [] and Counter(o["custom_id"] for o in out) == Counter(x["custom_id"] for x in lines)
    assert fake_upstream.stats()["repeated_bodies"] == 0  # no line was sent twice
    for verb, code in (("pause", "batch_not_pausable"), ("resume", "batch_not_resumable")):
        with pytest.raises(openai.BadRequestError) as exc:
            action(client, batch.id, verb)
        assert exc.value.code == code and exc.value.param == "batch_id"

    gone = wait_terminal(client, expiring.id, timeout=30)
    assert gone.status == "expired" and gone.expired_at is not None and gone.expired_at >= gone.expires_at
    assert extra(gone)["paused"] is False and extra(gone)["paused_at"] == extra(paused_early)["paused_at"]
    out, err = read_results(client, gone)
    assert out == [] and len(err) == 5 and all(e["error"]["code"] == "batch_expired" for e in err)


def rerun_makes_a_batch_of_the_failed_lines(server: Server) -> None:
    client = server.client()
    lines = [request_line(i, **({"fake_status": 400} if i % 4 == 1 else {})) for i in range(12)]
    done = wait_terminal(client, submit(client, lines, metadata={"job": "nightly"}).id)
    assert done.status == "completed" and done.request_counts.failed == 3
    rerun = action(client, done.id, "rerun")
    assert rerun.id != done.id and rerun.status == "validating"
    assert rerun.metadata == {"job": "nightly", "rerun_of": done.id}
    assert rerun.completion_window == done.completion_window
    failed = [x for i, x in enumerate(lines) if i % 4 == 1]
    new_input = client.files.content(rerun.input_file_id).text.splitlines()
    assert [json.loads(x) for x in new_input] == failed  # the original lines, in input order
    second = wait_terminal(client, rerun.id)
    assert second.request_counts.total == 3
    out, err = read_results(client, second)
    assert out == [] and sorted(e["custom_id"] for e in err) == sorted(x["custom_id"] for x in failed)
    renamed = action(client, done.id, "rerun", {"metadata": {"try": "2"}})
    assert renamed.metadata == {"try": "2", "rerun_of": done.id}
    clean = wait_terminal(client, submit(client, [request_line(1)]).id)
    with pytest.raises(openai.BadRequestError) as exc:
        action(client, clean.id, "rerun")
    assert exc.value.code == "nothing_to_rerun"
    with pytest.raises(openai.BadRequestError) as exc:
        action(client, done.id, "rerun", {"completion_window": "7d"})
    assert exc.value.param == "completion_window"


def extensions_are_scoped_to_the_project(server: Server) -> None:
    keys = {p: new_key_in_process(server, p) for p in ("alpha", "beta")}
    alpha = openai.OpenAI(base_url=server.base_url, api_key=keys["alpha"], max_retries=0)
    beta = openai.OpenAI(base_url=server.base_url, api_key=keys["beta"], max_retries=0)
    wait_until(
        lambda: httpx.get(server.base_url + "/files", timeout=10).status_code == 401, 5, what="keys to apply"
    )
    batch = wait_terminal(alpha, submit(alpha, [request_line(1, fake_status=400), request_line(2)]).id)
    for call in (
        lambda c: results(c, batch.id),
        lambda c: action(c, batch.id, "pause"),
        lambda c: action(c, batch.id, "resume"),
        lambda c: action(c, batch.id, "rerun"),
    ):
        with pytest.raises(openai.NotFoundError) as exc:
            call(beta)
        assert exc.value.code == "batch_not_found"
    assert action(alpha, batch.id, "rerun").metadata == {"rerun_of": batch.id}
