"""Tests for batchd.testing.fake_upstream: the scripted upstream every other test and
benchmark relies on, so its shapes, faults and counters must be exactly as documented."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

import batchd
from batchd.testing import (
    FAKE_PREFIX,
    FakeUpstream,
    FakeUpstreamHandle,
    body_digest,
    expected_content,
    fake_embedding,
)

REQ_ID = re.compile(r"^req_[0-9a-f]{32}$")
CHAT: dict[str, Any] = {
    "model": "gpt-test",
    "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}],
}


def call(
    url: str, body: Any = None, *, raw: bytes | None = None, method: str | None = None
) -> tuple[int, Any, Any]:
    """(status, headers, parsed JSON) for one request; HTTP errors are returned too."""
    data = raw if raw is not None else (None if body is None else orjson.dumps(body))
    req = urllib.request.Request(
        url,
        data=data,
        method=method or ("GET" if data is None else "POST"),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers, orjson.loads(r.read())
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.headers, orjson.loads(e.read())


def wait_for(pred: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached before deadline"
        time.sleep(0.005)


def assert_error(status: int, headers: Any, payload: Any, want: int, code: str | None) -> None:
    assert status == want
    assert REQ_ID.match(headers["x-request-id"])
    err = payload["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code and err["message"]


@pytest.fixture
def fu() -> Iterator[FakeUpstreamHandle]:
    with FakeUpstream.start_in_thread(seed=1) as handle:
        yield handle


def stable(resp: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resp.items() if k not in ("id", "created", "created_at")}


# ------------------------------------------------------------------------------ shapes
def test_chat_completion_shape_and_determinism(fu: FakeUpstreamHandle) -> None:
    s1, h1, r1 = call(f"{fu.base_url}/chat/completions", CHAT)
    s2, h2, r2 = call(f"{fu.base_url}/chat/completions", CHAT)
    assert s1 == s2 == 200
    assert REQ_ID.match(h1["x-request-id"]) and h1["x-request-id"] != h2["x-request-id"]
    assert re.match(r"^chatcmpl-[0-9a-f]+$", r1["id"]) and r1["id"] != r2["id"]
    assert r1["object"] == "chat.completion" and isinstance(r1["created"], int)
    assert r1["model"] == "gpt-test"
    (choice,) = r1["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == expected_content(CHAT, "/v1/chat/completions")
    assert choice["message"]["content"] == FAKE_PREFIX + "hello there"
    u = r1["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] > 0
    assert u["prompt_tokens_details"]["cached_tokens"] == 0
    assert u["completion_tokens_details"]["reasoning_tokens"] == 0
    assert stable(r1) == stable(r2)


def test_chat_content_parts_truncation_and_long_input(fu: FakeUpstreamHandle) -> None:
    body = {
        "model": "m",
        "max_tokens": 3,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "x" * 500}]}],
    }
    status, _, r = call(f"{fu.base_url}/chat/completions", body)
    assert status == 200
    assert r["choices"][0]["finish_reason"] == "length"
    assert r["usage"]["completion_tokens"] == 3
    assert r["choices"][0]["message"]["content"] == expected_content(body, "chat/completions")
    full = expected_content({**body, "max_tokens": None}, "chat/completions")
    assert full == FAKE_PREFIX + "x" * 200  # echo capped at 200 chars


def test_completions_and_responses_shapes(fu: FakeUpstreamHandle) -> None:
    body: dict[str, Any] = {"model": "davinci-fake", "prompt": "say hi"}
    status, _, r = call(f"{fu.base_url}/completions", body)
    assert status == 200 and r["object"] == "text_completion" and r["id"].startswith("cmpl-")
    assert r["choices"][0]["text"] == expected_content(body, "/v1/completions")
    assert r["usage"]["total_tokens"] == r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"]

    body = {
        "model": "gpt-resp",
        "instructions": "x",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "q?"}]}],
    }
    status, _, r = call(f"{fu.base_url}/responses", body)
    assert status == 200 and r["object"] == "response" and r["status"] == "completed"
    assert r["id"].startswith("resp_") and r["model"] == "gpt-resp"
    (item,) = r["output"]
    assert item["type"] == "message" and item["role"] == "assistant"
    assert item["content"][0] == {
        "type": "output_text",
        "annotations": [],
        "text": expected_content(body, "responses"),
    }
    assert item["content"][0]["text"] == FAKE_PREFIX + "q?"
    u = r["usage"]
    assert u["total_tokens"] == u["input_tokens"] + u["output_tokens"]
    assert u["input_tokens_details"] == {"cached_tokens": 0}
    assert u["output_tokens_details"] == {"reasoning_tokens": 0}
    _, _, r2 = call(f"{fu.base_url}/responses", body)
    assert r2["output"] == r["output"] and r2["usage"] == r["usage"]


def test_embeddings_moderations_models_health(fu: FakeUpstreamHandle) -> None:
    status, _, r = call(f"{fu.base_url}/embeddings", {"model": "emb", "input": ["a", "b"]})
    assert status == 200 and r["object"] == "list" and r["model"] == "emb"
    assert [d["index"] for d in r["data"]] == [0, 1]
    assert all(d["object"] == "embedding" and len(d["embedding"]) == 8 for d in r["data"])
    assert r["data"][0]["embedding"] == fake_embedding("a") != fake_embedding("b")
    assert r["usage"]["prompt_tokens"] == r["usage"]["total_tokens"] > 0
    _, _, one = call(f"{fu.base_url}/embeddings", {"model": "emb", "input": "a"})
    assert one["data"][0]["embedding"] == fake_embedding("a")
    _, _, b64 = call(f"{fu.base_url}/embeddings", {"model": "emb", "input": "a", "encoding_format": "base64"})
    vec = struct.unpack("<8f", base64.b64decode(b64["data"][0]["embedding"]))
    assert vec == pytest.approx(fake_embedding("a"), abs=1e-6)

    status, _, r = call(f"{fu.base_url}/moderations", {"input": ["x", "y"]})
    assert status == 200 and r["id"].startswith("modr-") and len(r["results"]) == 2
    assert r["results"][0]["flagged"] is False
    assert not any(r["results"][0]["categories"].values())

    status, _, r = call(f"{fu.base_url}/models")
    assert status == 200 and r["object"] == "list"
    assert all(m["object"] == "model" for m in r["data"])
    status, headers, r = call(f"{fu.url}/health")
    assert status == 200 and r == {"status": "ok"} and REQ_ID.match(headers["x-request-id"])


# ------------------------------------------------------------------------------ errors
def test_bad_requests_use_openai_error_envelope(fu: FakeUpstreamHandle) -> None:
    url = f"{fu.base_url}/chat/completions"
    assert_error(*call(url, raw=b"{not json"), 400, None)
    assert_error(*call(url, raw=b"[1, 2]"), 400, None)
    status, headers, r = call(url, {"messages": []})
    assert_error(status, headers, r, 400, "missing_required_parameter")
    assert r["error"]["param"] == "model" and r["error"]["type"] == "invalid_request_error"
    status, headers, r = call(f"{fu.base_url}/embeddings", {"input": "x"})
    assert_error(status, headers, r, 400, "missing_required_parameter")
    assert_error(*call(f"{fu.base_url}/nope", {"model": "m"}), 404, "unknown_url")
    assert_error(*call(url, method="GET"), 404, "unknown_url")


def test_fake_status_and_fake_latency(fu: FakeUpstreamHandle) -> None:
    status, headers, r = call(f"{fu.base_url}/chat/completions", {**CHAT, "fake_status": 422})
    assert_error(status, headers, r, 422, "fake_error")
    assert r["error"]["type"] == "invalid_request_error"
    t0 = time.monotonic()
    status, _, _ = call(f"{fu.base_url}/chat/completions", {**CHAT, "fake_latency": 0.3})
    assert status == 200 and time.monotonic() - t0 >= 0.29  # timer granularity


def test_fake_fail_times_fails_first_attempts_of_exact_body(fu: FakeUpstreamHandle) -> None:
    a = {**CHAT, "custom_id": "a", "fake_fail_times": 2}
    b = {**CHAT, "custom_id": "b", "fake_fail_times": 1}
    url = f"{fu.base_url}/chat/completions"
    for _ in range(2):
        assert_error(*call(url, a), 500, "fake_fail_times")
    assert_error(*call(url, b), 500, "fake_fail_times")
    assert call(url, b)[0] == 200
    assert call(url, a)[0] == 200
    assert call(url, a)[0] == 200  # stays successful afterwards


# -------------------------------------------------------------------------- server faults
def test_rpm_limit_answers_429_with_retry_after(fu: FakeUpstreamHandle) -> None:
    fu.configure(rpm=12, burst_seconds=10)  # bucket of 2, refilled at 0.2/s
    url = f"{fu.base_url}/chat/completions"
    remaining = []
    for _ in range(2):
        status, headers, _ = call(url, CHAT)
        assert status == 200 and headers["x-ratelimit-limit-requests"] == "12"
        assert headers["x-ratelimit-reset-requests"].endswith("s")
        remaining.append(headers["x-ratelimit-remaining-requests"])
    assert remaining == ["1", "0"]
    status, headers, r = call(url, CHAT)
    assert_error(status, headers, r, 429, "rate_limit_exceeded")
    assert 1 <= int(headers["retry-after"]) <= 5
    assert 0 < int(headers["retry-after-ms"]) <= 5000
    assert headers["x-ratelimit-remaining-requests"] == "0"
    fu.configure(rpm=None)
    assert call(url, CHAT)[0] == 200


def test_failure_rate_is_honoured_and_reproducible_with_seed() -> None:
    def statuses(h: FakeUpstreamHandle) -> list[int]:
        return [call(f"{h.base_url}/embeddings", {"model": "e", "input": str(i)})[0] for i in range(200)]

    with (
        FakeUpstream.start_in_thread(seed=7, failure_rate=0.3) as h1,
        FakeUpstream.start_in_thread(seed=7, failure_rate=0.3) as h2,
    ):
        first = statuses(h1)
        assert first == statuses(h2)
        assert set(first) == {200, 500} and 35 <= first.count(500) <= 85
        h1.configure(failure_rate=1.0, failure_status=503)
        assert_error(*call(f"{h1.base_url}/embeddings", {"model": "e", "input": "x"}), 503, "fake_failure")


def test_outage_answers_503_until_it_ends(fu: FakeUpstreamHandle) -> None:
    fu.outage(60)
    status, headers, r = call(f"{fu.base_url}/chat/completions", CHAT)
    assert_error(status, headers, r, 503, "service_unavailable")
    assert 1 <= int(headers["retry-after"]) <= 60
    assert call(f"{fu.url}/health")[0] == 503
    fu.configure(outage_until=0.0)
    assert call(f"{fu.base_url}/chat/completions", CHAT)[0] == 200


def test_max_concurrency_rejects_with_429(fu: FakeUpstreamHandle) -> None:
    fu.configure(max_concurrency=2)
    slow = {**CHAT, "fake_latency": 1.0}
    results: list[int] = []
    threads = [
        threading.Thread(target=lambda: results.append(call(f"{fu.base_url}/chat/completions", slow)[0]))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    wait_for(lambda: fu.stats()["in_flight"] == 2)
    assert_error(*call(f"{fu.base_url}/chat/completions", CHAT), 429, "rate_limit_exceeded")
    for t in threads:
        t.join(timeout=10)
    assert results == [200, 200]
    st = fu.stats()
    assert st["max_in_flight"] == 2 and st["in_flight"] == 0


# ------------------------------------------------------------------------------ stats
def test_stats_count_requests_and_repeated_successful_bodies(fu: FakeUpstreamHandle) -> None:
    url = f"{fu.base_url}/chat/completions"
    a, b = orjson.dumps(CHAT), orjson.dumps({**CHAT, "fake_status": 500})
    for raw in (a, a, a, b, b):
        call(url, raw=raw)
    call(f"{fu.base_url}/embeddings", {"model": "e", "input": "x"})
    call(f"{fu.url}/health")  # control/health requests are not counted
    st = fu.stats()
    assert st["requests"] == 6
    assert st["by_status"] == {200: 4, 500: 2}
    assert st["by_path"] == {"/v1/chat/completions": 5, "/v1/embeddings": 1}
    assert st["distinct_bodies"] == 3
    assert st["repeated_bodies"] == 2  # 2nd and 3rd copies of a; b never succeeded
    by_digest = fu.success_by_digest()
    assert by_digest[body_digest(a)] == 3 and body_digest(b) not in by_digest
    fu.reset_stats()
    st = fu.stats()
    assert st["requests"] == st["distinct_bodies"] == st["repeated_bodies"] == 0
    assert st["by_status"] == {} and fu.success_by_digest() == {}


def test_http_control_endpoints(fu: FakeUpstreamHandle) -> None:
    call(f"{fu.base_url}/chat/completions", CHAT)
    status, _, st = call(f"{fu.url}/_fake/stats?digests=1")
    assert status == 200 and st["requests"] == 1 and st["by_status"] == {"200": 1}
    assert st["success_by_digest"] == {body_digest(orjson.dumps(CHAT)): 1}
    status, _, cfg = call(f"{fu.url}/_fake/config", {"latency": 0.0, "outage_seconds": 30})
    assert status == 200 and cfg["latency"] == 0.0
    assert call(f"{fu.base_url}/chat/completions", CHAT)[0] == 503
    assert call(f"{fu.url}/_fake/config", {"outage_until": 0})[0] == 200
    assert call(f"{fu.base_url}/chat/completions", CHAT)[0] == 200
    assert_error(*call(f"{fu.url}/_fake/config", {"bogus": 1}), 400, None)
    assert call(f"{fu.url}/_fake/reset", {})[0] == 200
    assert call(f"{fu.url}/_fake/stats")[2]["requests"] == 0


def test_configure_validates() -> None:
    server = FakeUpstream()
    with pytest.raises(TypeError):
        server.configure(nope=1)
    with pytest.raises(ValueError):
        server.configure(failure_rate=2)
    assert server.configure(latency=0.1)["latency"] == 0.1


# --------------------------------------------------------------------------- runners
def test_start_in_thread_reports_bind_errors(fu: FakeUpstreamHandle) -> None:
    port = int(fu.url.rsplit(":", 1)[1])
    with pytest.raises(OSError):
        FakeUpstream.start_in_thread(port=port)


def test_async_context_manager() -> None:
    async def main() -> None:
        async with FakeUpstream(latency=0.0) as server, aiohttp.ClientSession() as s:
            assert re.match(r"^http://127\.0\.0\.1:\d+/v1$", server.base_url)
            rs = await asyncio.gather(
                *(s.post(f"{server.base_url}/chat/completions", json=CHAT) for _ in range(20))
            )
            for r in rs:
                assert r.status == 200
                assert (await r.json())["choices"][0]["message"]["content"] == expected_content(
                    CHAT, "chat/completions"
                )
            assert server.stats()["repeated_bodies"] == 19

    asyncio.run(main())


def test_run_fake_upstream_prints_url_and_stops_on_sigterm() -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(batchd.__file__).parents[1])}
    code = "from batchd.testing import run_fake_upstream; run_fake_upstream(port=0)"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.search(r"(http://127\.0\.0\.1:\d+)/v1", line)
        assert m, line
        assert call(f"{m.group(1)}/health")[0] == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
