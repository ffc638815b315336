"""The Batches API end to end: a real server, FakeUpstream over loopback, the official SDK."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import openai
import pytest
from openai.types import Batch

from batchd.testing import FAKE_PREFIX, expected_content
from batchd.testing.fake_upstream import FakeUpstreamHandle
from tests.support import Server, jsonl, read_results, request_line, wait_terminal, wait_until

ENDPOINTS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/moderations"]


def _submit(
    client: openai.OpenAI, lines: list[Any], endpoint: str = "/v1/chat/completions", **kw: Any
) -> Any:
    f = client.files.create(file=("batch.jsonl", jsonl(lines)), purpose="batch")
    return client.batches.create(input_file_id=f.id, endpoint=endpoint, completion_window="24h", **kw)  # type: ignore[arg-type]


def test_lifecycle_chat(server: Server, fake_upstream: FakeUpstreamHandle) -> None:
    client = server.client()
    lines = [request_line(i) for i in range(40)]
    batch = _submit(client, lines, metadata={"job": "nightly"})
    assert batch.status == "validating" and batch.object == "batch"
    assert batch.id.startswith("batch_") and batch.expires_at == batch.created_at + 86400
    assert batch.request_counts.total == 0 and batch.metadata == {"job": "nightly"}
    assert batch.in_progress_at is None and batch.output_file_id is None
    done = wait_terminal(client, batch.id)
    assert done.status == "completed", done
    assert done.request_counts.model_dump() == {"total": 40, "completed": 40, "failed": 0}
    assert done.model == "fake-model"
    assert done.error_file_id is None and done.errors is None
    for stamp in ("in_progress_at", "finalizing_at", "completed_at"):
        assert getattr(done, stamp) is not None
    assert done.failed_at is None and done.cancelled_at is None and done.expired_at is None
    out, err = read_results(client, done)
    assert err == []
    assert sorted(o["custom_id"] for o in out) == sorted(line["custom_id"] for line in lines)
    by_id = {line["custom_id"]: line for line in lines}
    for o in out:
        assert o["id"].startswith("batch_req_") and o["error"] is None
        assert o["response"]["status_code"] == 200
        assert o["response"]["request_id"].startswith("req_")
        body = o["response"]["body"]
        assert isinstance(body, dict)
        content = body["choices"][0]["message"]["content"]
        assert content.startswith(FAKE_PREFIX)
        assert content == expected_content(by_id[o["custom_id"]]["body"], "/v1/chat/completions")
    usage = done.usage
    assert usage is not None and usage.total_tokens > 0
    assert usage.input_tokens == sum(o["response"]["body"]["usage"]["prompt_tokens"] for o in out)
    assert usage.output_tokens == sum(o["response"]["body"]["usage"]["completion_tokens"] for o in out)
    out_file = client.files.retrieve(done.output_file_id)
    assert out_file.purpose == "batch_output" and out_file.status == "processed"
    assert out_file.bytes == len(client.files.content(done.output_file_id).content)
    assert fake_upstream.stats()["requests"] == 40
    assert server.hook.checked > 5


@pytest.mark.backends("sqlite")
@pytest.mark.parametrize("endpoint", ENDPOINTS[1:])
def test_every_endpoint(server: Server, endpoint: str) -> None:
    client = server.client()
    done = wait_terminal(
        client, _submit(client, [request_line(i, url=endpoint) for i in range(5)], endpoint).id
    )
    assert done.status == "completed" and done.request_counts.completed == 5
    out, err = read_results(client, done)
    assert len(out) == 5 and err == []


@pytest.mark.backends("sqlite")
def test_mixed_upstream_4xx_go_to_error_file(server: Server) -> None:
    client = server.client()
    lines = [request_line(i, **({"fake_status": 400} if i % 3 == 0 else {})) for i in range(12)]
    lines.append(request_line("forbidden", fake_status=403))
    done = wait_terminal(client, _submit(client, lines).id)
    assert done.status == "completed"
    assert done.request_counts.model_dump() == {"total": 13, "completed": 8, "failed": 5}
    out, err = read_results(client, done)
    assert len(out) == 8 and len(err) == 5
    assert {e["custom_id"] for e in err} == {"req-0", "req-3", "req-6", "req-9", "req-forbidden"}
    for e in err:
        assert e["error"] is None
        assert e["response"]["status_code"] in (400, 403)
        assert set(e["response"]["body"]["error"]) >= {"message", "type", "code"}
    assert all(o["response"]["status_code"] == 200 for o in out)


@pytest.mark.backends("sqlite")
def test_all_lines_failing_is_still_completed(server: Server) -> None:
    client = server.client()
    done = wait_terminal(client, _submit(client, [request_line(i, fake_status=422) for i in range(3)]).id)
    assert done.status == "completed" and done.output_file_id is None and done.error_file_id
    assert done.request_counts.failed == 3


@pytest.mark.backends("sqlite")
def test_transient_faults_are_retried(server: Server, fake_upstream: FakeUpstreamHandle) -> None:
    client = server.client()
    lines = [request_line(i, fake_fail_times=2) for i in range(5)]
    fake_upstream.configure(rpm=600)
    done = wait_terminal(client, _submit(client, lines).id, timeout=90)
    assert done.status == "completed" and done.request_counts.completed == 5
    stats = fake_upstream.stats()
    assert stats["by_status"].get(500, 0) == 10
    assert stats["by_status"][200] == 5


@pytest.mark.backends("sqlite")
def test_create_errors(server: Server) -> None:
    client = server.client()
    f = client.files.create(file=("b.jsonl", jsonl([request_line(1)])), purpose="batch")
    with pytest.raises(openai.BadRequestError) as missing:
        client.post(
            "/batches", body={"endpoint": "/v1/chat/completions", "completion_window": "24h"}, cast_to=Batch
        )
    assert missing.value.param == "input_file_id" and missing.value.code == "missing_required_parameter"
    assert missing.value.body["message"] == "Missing required parameter: 'input_file_id'."  # type: ignore[index]
    cases: list[tuple[dict[str, Any], type[Exception], str | None, str | None]] = [
        (
            {"input_file_id": f.id, "endpoint": "/v1/images/edits", "completion_window": "24h"},
            openai.BadRequestError,
            "endpoint",
            "invalid_value",
        ),
        (
            {"input_file_id": f.id, "endpoint": "/v1/chat/completions", "completion_window": "7d"},
            openai.BadRequestError,
            "completion_window",
            "invalid_value",
        ),
        (
            {"input_file_id": "file-nope", "endpoint": "/v1/chat/completions", "completion_window": "24h"},
            openai.NotFoundError,
            "input_file_id",
            None,
        ),
        (
            {
                "input_file_id": f.id,
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
                "metadata": {f"k{i}": "v" for i in range(17)},
            },
            openai.BadRequestError,
            "metadata",
            "invalid_value",
        ),
        (
            {
                "input_file_id": f.id,
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
                "metadata": {"k": "v" * 513},
            },
            openai.BadRequestError,
            "metadata",
            "invalid_value",
        ),
        (
            {
                "input_file_id": f.id,
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
                "metadata": {"k": 5},
            },
            openai.BadRequestError,
            "metadata.k",
            "invalid_type",
        ),
        (
            {
                "input_file_id": f.id,
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
                "output_expires_after": {"anchor": "created_at", "seconds": 5},
            },
            openai.BadRequestError,
            "output_expires_after.seconds",
            "invalid_value",
        ),
    ]
    for params, exc_type, param, code in cases:
        with pytest.raises(exc_type) as exc:
            client.batches.create(**params)
        assert exc.value.param == param, (params, exc.value.body)  # type: ignore[attr-defined]
        assert exc.value.code == code, (params, exc.value.body)  # type: ignore[attr-defined]
    user_file = client.files.create(file=b"x", purpose="user_data")
    with pytest.raises(openai.BadRequestError) as exc2:
        client.batches.create(
            input_file_id=user_file.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert exc2.value.param == "input_file_id"
    assert client.batches.list().data == []


def test_output_expires_after(server: Server) -> None:
    client = server.client()
    done = wait_terminal(
        client,
        _submit(client, [request_line(1)], output_expires_after={"anchor": "created_at", "seconds": 7200}).id,
    )
    out_file = client.files.retrieve(done.output_file_id)
    assert out_file.expires_at == out_file.created_at + 7200


@pytest.mark.backends("sqlite")
def test_unknown_batch_is_404(server: Server) -> None:
    client = server.client()
    with pytest.raises(openai.NotFoundError) as exc:
        client.batches.retrieve("batch_doesnotexist")
    assert exc.value.code == "batch_not_found"
    with pytest.raises(openai.NotFoundError):
        client.batches.cancel("batch_doesnotexist")


VALIDATION_CASES: list[tuple[str, str, str | None]] = [
    ("{not json", "invalid_json_line", None),
    ("[1, 2]", "invalid_json_line", None),
    (
        json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": {}}),
        "missing_required_parameter",
        "custom_id",
    ),
    (
        json.dumps({"custom_id": "a", "url": "/v1/chat/completions", "body": {}}),
        "missing_required_parameter",
        "method",
    ),
    (json.dumps({"custom_id": "b", "method": "POST", "body": {}}), "missing_required_parameter", "url"),
    (
        json.dumps({"custom_id": "c", "method": "POST", "url": "/v1/chat/completions"}),
        "missing_required_parameter",
        "body",
    ),
    (
        json.dumps({"custom_id": 7, "method": "POST", "url": "/v1/chat/completions", "body": {}}),
        "invalid_type",
        "custom_id",
    ),
    (
        json.dumps({"custom_id": "d", "method": "POST", "url": "/v1/chat/completions", "body": "x"}),
        "invalid_type",
        "body",
    ),
    (json.dumps(request_line(1)), "duplicate_custom_id", "custom_id"),
    (json.dumps({**request_line("e"), "url": "/v1/embeddings"}), "url_mismatch", "url"),
    (json.dumps({**request_line("f"), "method": "GET"}), "invalid_method", "method"),
    (json.dumps(request_line("g", stream=True)), "stream_not_supported", "body.stream"),
    (json.dumps(request_line("h", model="other-model")), "model_mismatch", "body.model"),
]


def test_validation_reports_every_error_with_its_line(
    server: Server, fake_upstream: FakeUpstreamHandle
) -> None:
    client = server.client()
    text = json.dumps(request_line(1)) + "\n" + "\n".join(raw for raw, _, _ in VALIDATION_CASES) + "\n"
    f = client.files.create(file=("bad.jsonl", text.encode()), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    done = wait_terminal(client, b.id)
    assert done.status == "failed" and done.failed_at is not None
    assert done.errors is not None and done.errors.object == "list"
    got = [(e.line, e.code, e.param) for e in done.errors.data]
    want = [(i + 2, code, param) for i, (_, code, param) in enumerate(VALIDATION_CASES)]
    assert got == want
    assert all(e.message for e in done.errors.data)
    assert done.output_file_id is None and done.error_file_id is None
    assert fake_upstream.stats()["requests"] == 0


@pytest.mark.backends("sqlite")
def test_empty_file_fails(server: Server) -> None:
    client = server.client()
    f = client.files.create(file=("empty.jsonl", b"\n\n"), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    done = wait_terminal(client, b.id)
    assert done.status == "failed" and done.errors is not None
    assert [e.code for e in done.errors.data] == ["empty_file"]


@pytest.mark.backends("sqlite")
def test_too_many_lines(make_server: Any, fake_upstream: FakeUpstreamHandle) -> None:
    server = make_server(fake_upstream.base_url, batchd_max_lines_per_batch="5")
    client = server.client()
    done = wait_terminal(client, _submit(client, [request_line(i) for i in range(6)]).id)
    assert done.status == "failed" and done.errors is not None
    assert [e.code for e in done.errors.data] == ["too_many_tasks"]
    assert "BATCHD_MAX_LINES_PER_BATCH" in done.errors.data[0].message
    assert fake_upstream.stats()["requests"] == 0


@pytest.mark.backends("sqlite")
def test_crlf_bom_blank_lines_and_no_final_newline(server: Server) -> None:
    client = server.client()
    lines = [json.dumps(request_line(i)) for i in range(4)]
    text = "\ufeff" + lines[0] + "\r\n\r\n" + lines[1] + "\r\n" + "   \n" + lines[2] + "\n" + lines[3]
    f = client.files.create(file=("crlf.jsonl", text.encode()), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    done = wait_terminal(client, b.id)
    assert done.status == "completed" and done.request_counts.total == 4
    out, _ = read_results(client, done)
    assert sorted(o["custom_id"] for o in out) == [f"req-{i}" for i in range(4)]


def test_list_batches_pagination(server: Server) -> None:
    client = server.client()
    ids = [_submit(client, [request_line(i)]).id for i in range(4)]
    page = client.batches.list(limit=3)
    assert [b.id for b in page.data] == ids[::-1][:3] and page.has_more
    assert [b.id for b in client.batches.list(limit=3)] == ids[::-1]
    assert client.batches.list(after=ids[0]).data == []
    with pytest.raises(openai.BadRequestError):
        client.batches.list(limit=101)


def _assert_exactly_once(lines: list[dict[str, Any]], out: list[Any], err: list[Any]) -> None:
    seen = Counter(x["custom_id"] for x in out + err)
    assert set(seen) == {line["custom_id"] for line in lines}
    assert max(seen.values()) == 1


def test_cancel_mid_run(make_server: Any, fake_upstream: FakeUpstreamHandle) -> None:
    fake_upstream.configure(latency=0.05)
    server = make_server(fake_upstream.base_url, batchd_upstream_concurrency="4", batchd_chunk_lines="10")
    client = server.client()
    lines = [request_line(i) for i in range(300)]
    batch = _submit(client, lines)
    wait_until(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 20, 60, what="progress")
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at is not None
    done = wait_terminal(client, batch.id)
    assert done.status == "cancelled" and done.cancelled_at is not None
    assert client.batches.cancel(batch.id).status == "cancelled"  # idempotent, 200
    out, err = read_results(client, done)
    _assert_exactly_once(lines, out, err)
    assert len(out) == done.request_counts.completed >= 20
    cancelled = [e for e in err if e["error"] and e["error"]["code"] == "batch_cancelled"]
    assert cancelled and all(e["response"] is None for e in cancelled)
    assert len(cancelled) == len(err) and fake_upstream.stats()["requests"] < 300


@pytest.mark.backends("sqlite")
def test_cancel_finished_batch_is_a_final_400(server: Server, fake_upstream: FakeUpstreamHandle) -> None:
    client = server.client(max_retries=2)
    done = wait_terminal(client, _submit(client, [request_line(1)]).id)
    before = server.hook.checked
    with pytest.raises(openai.BadRequestError) as exc:
        client.batches.cancel(done.id)
    assert exc.value.code == "batch_not_cancellable"
    assert server.hook.checked == before + 1, "a final conflict must not be retried by the SDK"


def test_expiry_keeps_finished_work(make_server: Any, fake_upstream: FakeUpstreamHandle) -> None:
    fake_upstream.configure(latency=0.1)
    server = make_server(
        fake_upstream.base_url,
        batchd_completion_windows="24h,3s",
        batchd_upstream_concurrency="2",
        batchd_chunk_lines="10",
    )
    client = server.client()
    lines = [request_line(i) for i in range(200)]
    f = client.files.create(file=("slow.jsonl", jsonl(lines)), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="3s")  # type: ignore[arg-type]
    assert b.expires_at == b.created_at + 3
    done = wait_terminal(client, b.id, timeout=30)
    assert done.status == "expired" and done.expired_at is not None
    assert done.completed_at is None
    out, err = read_results(client, done)
    _assert_exactly_once(lines, out, err)
    assert 0 < len(out) < 200
    assert all(e["error"]["code"] == "batch_expired" and e["response"] is None for e in err)
    assert done.request_counts.completed == len(out)
