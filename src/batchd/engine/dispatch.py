"""Sending one line: deadline -> retries -> lane (route, budgets, window) -> upstream.send."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from batchd.engine.lanes import Lane, Router
from batchd.engine.results import LineResult, error_result, http_result, usage_of
from batchd.engine.retry import GiveUp, decide, is_retryable, parse_retry_after
from batchd.upstreams.base import UpstreamError, UpstreamResponse, UpstreamTimeout


@dataclass(frozen=True)
class SendPolicy:
    request_timeout: float
    max_attempts: int


@dataclass(frozen=True)
class Backoff:
    """Try the line again after ``delay`` seconds; ``attempt`` attempts are spent so far."""

    delay: float
    attempt: int


@dataclass(frozen=True)
class LineRequest:
    custom_id: str
    model: str
    path: str
    body: bytes
    tokens: int


def no_upstream(model: str) -> UpstreamResponse:
    body = {
        "error": {
            "message": f"No configured upstream serves the model '{model}'.",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }
    return UpstreamResponse(404, orjson.dumps(body))


def _total_tokens(body: bytes) -> int | None:
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return usage_of(obj)[4] or None if isinstance(obj, dict) else None


async def send_line(
    router: Router,
    req: LineRequest,
    *,
    deadline: float,
    policy: SendPolicy,
    stopping: Callable[[], bool],
    attempt: int = 0,
    defer: bool = False,
) -> LineResult | Backoff | None:
    """The line's final result, or None when it must stay unfinished: the batch is stopping
    or its deadline came before a transient fault cleared (it then ends as ``batch_expired``
    or ``batch_cancelled``, never as a failure it did not earn).

    Failures while the upstream is down (every request failing) and 429s do not spend the
    line's attempts: the lane pauses and lines wait, until the deadline.

    With ``defer``, a backoff is returned as a ``Backoff`` instead of slept here, so the
    caller's sender can serve other lines meanwhile and call again with ``attempt``."""
    while True:
        lane = router.pick(req.model)
        if lane is None:
            return http_result(req.custom_id, no_upstream(req.model))
        admitted = lane.try_admit(req.tokens) or await _wait_for_admission(router, lane, req.tokens, deadline)
        if not admitted:
            if admitted is None:
                return None
            continue  # the lane went down while we waited and another upstream is up
        if stopping():
            lane.abandon()
            return None
        resp: UpstreamResponse | None = None
        failure: UpstreamError | None = None
        try:
            resp = await lane.client.send(
                req.path, req.body, min(policy.request_timeout, max(deadline - time.time(), 0.001))
            )
        except UpstreamError as exc:
            failure = exc
        finally:
            if resp is None:
                lane.finish(None, {}, req.tokens, None, timed_out=isinstance(failure, UpstreamTimeout))
        if resp is not None:
            _finish_answered(lane, req, resp)
            if not is_retryable(resp.status):
                return http_result(req.custom_id, resp)
        attempt, next_step = _after_fault(lane, req, resp, failure, attempt, policy, deadline, stopping)
        if not isinstance(next_step, float):
            return next_step
        if defer:
            return Backoff(next_step, attempt)
        await asyncio.sleep(next_step)


def _finish_answered(lane: Lane, req: LineRequest, resp: UpstreamResponse) -> None:
    """Tell the lane how an answered request went, with the tokens it really used when a
    tokens/min budget needs them."""
    used = None
    if req.tokens and lane.tpm.per_minute and 200 <= resp.status < 300:
        used = _total_tokens(resp.body)
    lane.finish(resp.status, resp.headers, req.tokens, used, timed_out=False)


async def _wait_for_admission(router: Router, lane: Lane, tokens: int, deadline: float) -> bool | None:
    """The slow way in: True when admitted, False to route again, None past the deadline."""
    left = deadline - time.time()
    if left <= 0:
        return None
    try:
        async with asyncio.timeout(left):
            return await lane.admit(tokens, elsewhere=router.other_up)
    except TimeoutError:
        return None


def _after_fault(
    lane: Lane,
    req: LineRequest,
    resp: UpstreamResponse | None,
    failure: UpstreamError | None,
    attempt: int,
    policy: SendPolicy,
    deadline: float,
    stopping: Callable[[], bool],
) -> tuple[int, float | LineResult | None]:
    """After a retryable answer or no answer: (attempts spent, seconds to wait before the
    next try, or the line's final result, or None to leave it unfinished).

    An outage (the upstream fails everything) or a 429 ("slow down") costs the line time,
    not attempts: it waits, until the deadline; only faults of a working upstream count."""
    status = resp.status if resp is not None else None
    counted = not lane.health.down and status != 429
    attempt += counted
    choice = decide(
        status=status,
        attempt=max(attempt, 1),
        max_attempts=policy.max_attempts if counted else attempt + 2,
        retry_after=parse_retry_after(resp.headers, time.time()) if resp is not None else None,
        now=time.time(),
        deadline=deadline,
        jitter=random.random(),
    )
    if isinstance(choice, GiveUp):
        if choice.reason == "deadline" or stopping():
            return attempt, None
        if resp is not None:
            return attempt, http_result(req.custom_id, resp)
        assert failure is not None
        return attempt, error_result(req.custom_id, failure.code)
    if stopping():
        return attempt, None
    lane.metrics.retry(str(status) if status is not None else _no_answer(failure))
    return attempt, float(choice.delay)


def _no_answer(failure: UpstreamError | None) -> str:
    return "timeout" if isinstance(failure, UpstreamTimeout) else "error"
