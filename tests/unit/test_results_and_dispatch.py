"""Output lines in OpenAI's shape, and the send chain against a MockUpstream."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import orjson
import pytest

from batchd.engine import retry
from batchd.engine.dispatch import Backoff, LineRequest, SendPolicy, send_line
from batchd.engine.lanes import Router, UpstreamSpec
from batchd.engine.results import LineResult, error_result, http_result, usage_of
from batchd.upstreams.base import MockUpstream, UpstreamError, UpstreamResponse, UpstreamTimeout
from tests.support import assert_schema


def test_success_line_shape() -> None:
    body = {"id": "x", "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}
    r = http_result("c1", UpstreamResponse(200, orjson.dumps(body), {"x-request-id": "req_up"}))
    obj = json.loads(r.line)
    assert r.ok and r.line.endswith(b"\n") and r.usage == (3, 0, 4, 0, 7)
    assert obj["response"] == {"status_code": 200, "request_id": "req_up", "body": body}
    assert obj["error"] is None and obj["id"].startswith("batch_req_")
    assert_schema("BatchRequestOutput", obj)


def test_http_error_and_garbage_bodies() -> None:
    err = http_result("c2", UpstreamResponse(400, b'{"error": {"message": "bad"}}'))
    obj = json.loads(err.line)
    assert not err.ok and err.http_error and obj["response"]["status_code"] == 400 and obj["error"] is None
    assert obj["response"]["request_id"].startswith("req_")
    garbage = json.loads(http_result("c3", UpstreamResponse(200, b"<html>")).line)
    assert garbage["response"]["status_code"] == 502
    assert garbage["response"]["body"]["error"]["code"] == "invalid_upstream_response"
    for o in (obj, garbage):
        assert_schema("BatchRequestOutput", o)


def test_output_line_is_one_json_line_whatever_the_upstream_bytes() -> None:
    """Raw upstream bytes are embedded only when they are one line; pretty-printed bodies are
    re-serialised, and ids that need escaping are escaped."""
    body = {"id": "x", "choices": [{"text": 'a\nb \u2028 "q"'}], "usage": {"total_tokens": 2}}
    for raw in (orjson.dumps(body), json.dumps(body, indent=2).encode(), b"\r\n" + orjson.dumps(body)):
        r = http_result('we"ird\\id\u00e9', UpstreamResponse(200, raw, {"x-request-id": 'r"1'}))
        assert r.line.count(b"\n") == 1 and r.line.endswith(b"\n")
        obj = json.loads(r.line)
        assert obj["custom_id"] == 'we"ird\\id\u00e9' and obj["response"]["request_id"] == 'r"1'
        assert obj["response"]["body"] == body and r.usage[4] == 2
        assert_schema("BatchRequestOutput", obj)


def test_non_http_error_line() -> None:
    obj = json.loads(error_result("c4", "batch_expired").line)
    assert obj["response"] is None and obj["error"]["code"] == "batch_expired" and obj["error"]["message"]
    assert_schema("BatchRequestOutput", obj)


def test_usage_of_responses_api_names() -> None:
    body = {
        "usage": {
            "input_tokens": 5,
            "input_tokens_details": {"cached_tokens": 2},
            "output_tokens": 6,
            "output_tokens_details": {"reasoning_tokens": 1},
            "total_tokens": 11,
        }
    }
    assert usage_of(body) == (5, 2, 6, 1, 11)
    assert usage_of({"usage": "nonsense"}) == (0, 0, 0, 0, 0)
    assert usage_of({"usage": {"prompt_tokens": True}}) == (0, 0, 0, 0, 0)


POLICY = SendPolicy(request_timeout=5, max_attempts=4)


def _router(handler, max_attempts: int = 4):  # type: ignore[no-untyped-def]
    return Router([(UpstreamSpec(name="u", url="http://unused"), MockUpstream(handler))])


def _send(handler, *, deadline: float = 60, stopping=lambda: False, policy: SendPolicy = POLICY):  # type: ignore[no-untyped-def]
    calls: list[int] = []

    async def counted(path: str, body: bytes) -> UpstreamResponse:
        calls.append(1)
        return await handler(len(calls))

    async def go():  # type: ignore[no-untyped-def]
        req = LineRequest("cid", "m", "/chat/completions", b"{}", 10)
        return await send_line(
            _router(counted), req, deadline=time.time() + deadline, policy=policy, stopping=stopping
        )

    return asyncio.run(go()), len(calls)


def test_retries_until_success_honouring_retry_after() -> None:
    async def handler(n: int) -> UpstreamResponse:
        if n == 1:
            return UpstreamResponse(429, b"{}", {"retry-after-ms": "10"})
        if n == 2:
            return UpstreamResponse(503, b"{}", {"retry-after": "0"})
        return UpstreamResponse(200, b'{"ok": true}')

    result, calls = _send(handler)
    assert result is not None and result.ok and calls == 3


def test_client_error_is_not_retried() -> None:
    async def handler(n: int) -> UpstreamResponse:
        return UpstreamResponse(400, b'{"error": {"message": "no"}}')

    result, calls = _send(handler)
    assert result is not None and not result.ok and calls == 1


def test_timeouts_exhaust_attempts_while_the_upstream_is_up() -> None:
    async def handler(n: int) -> UpstreamResponse:
        raise UpstreamTimeout("slow")

    result, calls = _send(handler, policy=SendPolicy(request_timeout=5, max_attempts=2))
    assert result is not None and calls == 2
    obj = json.loads(result.line)
    assert obj["response"] is None and obj["error"]["code"] == "request_timeout"


def test_outage_does_not_spend_attempts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Eight connection failures in a row mark the upstream down; the line keeps waiting (on
    probes) instead of failing after max_attempts, and succeeds when the upstream is back.
    (Backoff capped at 50 ms: the count of calls is the point, not the real delays.)"""
    monkeypatch.setattr(retry, "MAX_BACKOFF", 0.05)

    async def handler(n: int) -> UpstreamResponse:
        if n <= 8:
            raise UpstreamError("connection refused")
        return UpstreamResponse(200, b'{"ok": true}')

    result, calls = _send(handler, policy=SendPolicy(request_timeout=5, max_attempts=6))
    assert result is not None and result.ok and calls == 9


def test_deadline_leaves_the_line_unfinished() -> None:
    async def handler(n: int) -> UpstreamResponse:
        return UpstreamResponse(500, b"{}", {"retry-after": "30"})

    result, calls = _send(handler, deadline=5)
    assert result is None and calls == 1


def test_stopping_batch_abandons_retries() -> None:
    async def handler(n: int) -> UpstreamResponse:
        return UpstreamResponse(503, b"{}")

    result, calls = _send(handler, stopping=lambda: True)
    assert result is None and calls <= 1


def test_unserved_model_is_a_404_line() -> None:
    async def go():  # type: ignore[no-untyped-def]
        router = Router([(UpstreamSpec(name="u", url="http://x", models=("only-this",)), MockUpstream(None))])  # type: ignore[arg-type]
        req = LineRequest("cid", "other", "/chat/completions", b"{}", 0)
        return await send_line(router, req, deadline=time.time() + 5, policy=POLICY, stopping=lambda: False)

    result = asyncio.run(go())
    obj = json.loads(result.line)
    assert obj["response"]["status_code"] == 404
    assert obj["response"]["body"]["error"]["code"] == "model_not_found"


def test_429s_do_not_spend_attempts() -> None:
    async def handler(n: int) -> UpstreamResponse:
        if n <= 10:
            return UpstreamResponse(429, b"{}", {"retry-after-ms": "1"})
        return UpstreamResponse(200, b'{"ok": true}')

    result, calls = _send(handler, policy=SendPolicy(request_timeout=5, max_attempts=3))
    assert result is not None and result.ok and calls == 11


@pytest.mark.parametrize("client", ["aiohttp", "pyreqwest"])
def test_http_upstreams_pass_rate_limit_headers_to_the_lane(client: str) -> None:
    """The lane learns limits only if the client hands the x-ratelimit-* headers through."""
    from batchd.testing import FakeUpstream

    async def go(url: str) -> UpstreamResponse:
        upstream = _http_client(client, url)
        try:
            return await upstream.send("/chat/completions", b'{"model": "m", "messages": []}', 5)
        finally:
            await upstream.aclose()

    with FakeUpstream.start_in_thread(rpm=600) as fu:
        resp = asyncio.run(go(fu.base_url))
    assert resp.status == 200 and isinstance(resp.body, bytes)
    assert json.loads(resp.body)["object"] == "chat.completion"
    assert resp.headers["x-ratelimit-limit-requests"] == "600"
    assert "x-ratelimit-remaining-requests" in resp.headers and resp.headers["x-request-id"].startswith(
        "req_"
    )


@pytest.mark.parametrize("client", ["aiohttp", "pyreqwest"])
def test_http_upstreams_map_refusals_and_timeouts(client: str) -> None:
    """No HTTP answer is an UpstreamError (connection) or UpstreamTimeout (no answer in time);
    an HTTP error status is an answer, with its body and retry hints."""
    from batchd.testing import FakeUpstream

    async def go(url: str, path: str, timeout: float) -> UpstreamResponse | Exception:
        upstream = _http_client(client, url)
        try:
            return await upstream.send(path, b'{"model": "m", "messages": []}', timeout)
        except UpstreamError as exc:
            return exc
        finally:
            await upstream.aclose()

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    refused = asyncio.run(go(dead, "/chat/completions", 5))
    assert type(refused) is UpstreamError and str(refused)
    with FakeUpstream.start_in_thread(latency=2.0) as fu:
        slow = asyncio.run(go(fu.base_url, "/chat/completions", 0.3))
    assert isinstance(slow, UpstreamTimeout)
    with FakeUpstream.start_in_thread(rpm=1) as fu:
        first = asyncio.run(go(fu.base_url, "/chat/completions", 5))
        limited = asyncio.run(go(fu.base_url, "/chat/completions", 5))
    assert isinstance(first, UpstreamResponse) and first.status == 200
    assert isinstance(limited, UpstreamResponse) and limited.status == 429
    assert "retry-after" in limited.headers or "retry-after-ms" in limited.headers


def _http_client(name: str, url: str):  # type: ignore[no-untyped-def]
    from batchd.upstreams.http import HttpUpstream
    from batchd.upstreams.reqwest import ReqwestUpstream

    return (HttpUpstream if name == "aiohttp" else ReqwestUpstream)(url, None, 4)


def test_deferred_backoff_is_handed_back_with_the_attempts_spent() -> None:
    """With ``defer``, a retryable fault returns a Backoff instead of sleeping in the sender;
    calling again with its ``attempt`` continues the same attempt budget."""

    async def failing(path: str, body: bytes) -> UpstreamResponse:
        return UpstreamResponse(500, b'{"error": {"message": "boom"}}')

    async def go():  # type: ignore[no-untyped-def]
        router = _router(failing)
        req = LineRequest("cid", "m", "/chat/completions", b"{}", 10)
        outcomes = []
        attempt = 0
        for _ in range(10):
            out = await send_line(
                router,
                req,
                deadline=time.time() + 600,
                policy=POLICY,
                stopping=lambda: False,
                attempt=attempt,
                defer=True,
            )
            outcomes.append(out)
            if not isinstance(out, Backoff):
                break
            attempt = out.attempt
        return outcomes

    outcomes = asyncio.run(go())
    assert [o.attempt for o in outcomes[:-1]] == [1, 2, 3]  # type: ignore[union-attr]
    assert all(o.delay > 0 for o in outcomes[:-1])  # type: ignore[union-attr]
    final = outcomes[-1]
    assert isinstance(final, LineResult) and not final.ok and final.http_error
