"""Sending one line: deadline -> retries -> upstream.send, as a chain of small steps."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from batchd.engine.results import LineResult, error_result, http_result
from batchd.engine.retry import GiveUp, decide, is_retryable, parse_retry_after
from batchd.upstreams.base import Upstream, UpstreamError, UpstreamResponse


@dataclass(frozen=True)
class SendPolicy:
    request_timeout: float
    max_attempts: int


async def send_line(
    upstream: Upstream,
    path: str,
    custom_id: str,
    body: bytes,
    *,
    deadline: float,
    policy: SendPolicy,
    stopping: Callable[[], bool],
) -> LineResult | None:
    """The line's final result, or None when it must stay unfinished: the batch is stopping
    or its deadline came before a transient fault cleared (it then ends as ``batch_expired``
    or ``batch_cancelled``, never as a failure it did not earn)."""
    attempt = 0
    while True:
        attempt += 1
        now = time.time()
        timeout = min(policy.request_timeout, deadline - now)
        if timeout <= 0:
            return None
        resp: UpstreamResponse | None = None
        failure: UpstreamError | None = None
        try:
            resp = await upstream.send(path, body, timeout)
        except UpstreamError as exc:
            failure = exc
        status = resp.status if resp is not None else None
        if resp is not None and not is_retryable(status):
            return http_result(custom_id, resp)
        choice = decide(
            status=status,
            attempt=attempt,
            max_attempts=policy.max_attempts,
            retry_after=parse_retry_after(resp.headers, time.time()) if resp is not None else None,
            now=time.time(),
            deadline=deadline,
            jitter=random.random(),
        )
        if isinstance(choice, GiveUp):
            if choice.reason == "deadline" or stopping():
                return None
            if resp is not None:
                return http_result(custom_id, resp)
            assert failure is not None
            return error_result(custom_id, failure.code)
        if stopping():
            return None
        await asyncio.sleep(choice.delay)
