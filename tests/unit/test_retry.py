"""The retry decision as a table: no I/O, no clock."""

from __future__ import annotations

import email.utils

import pytest

from batchd.engine.retry import GiveUp, Retry, decide, is_retryable, parse_retry_after


@pytest.mark.parametrize(
    ("status", "attempt", "retry_after", "deadline", "expected"),
    [
        (429, 1, None, 1000.0, Retry(0.5)),
        (500, 2, None, 1000.0, Retry(1.0)),
        (503, 3, None, 1000.0, Retry(2.0)),
        (None, 1, None, 1000.0, Retry(0.5)),  # connection error / timeout
        (408, 1, None, 1000.0, Retry(0.5)),
        (429, 1, 7.0, 1000.0, Retry(7.0)),  # retry-after wins over backoff
        (429, 20, None, 1000.0, GiveUp("attempts exhausted")),
        (400, 1, None, 1000.0, GiveUp("not retryable")),
        (404, 1, None, 1000.0, GiveUp("not retryable")),
        (422, 1, None, 1000.0, GiveUp("not retryable")),
        (500, 1, 5.0, 104.0, GiveUp("deadline")),  # would wake after the deadline
        (500, 12, None, 1000.0, Retry(30.0)),  # capped backoff
    ],
)
def test_decide(
    status: int | None, attempt: int, retry_after: float | None, deadline: float, expected: object
) -> None:
    got = decide(
        status=status,
        attempt=attempt,
        max_attempts=15 if attempt != 20 else 20,
        retry_after=retry_after,
        now=100.0,
        deadline=deadline,
        jitter=0.5,
    )
    assert got == expected


def test_jitter_spreads_backoff() -> None:
    low = decide(status=500, attempt=3, max_attempts=9, retry_after=None, now=0, deadline=1e9, jitter=0.0)
    high = decide(status=500, attempt=3, max_attempts=9, retry_after=None, now=0, deadline=1e9, jitter=0.999)
    assert isinstance(low, Retry) and isinstance(high, Retry)
    assert low.delay == pytest.approx(1.5) and high.delay == pytest.approx(2.5, abs=0.01)


def test_parse_retry_after_forms() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after({"retry-after": "3"}, now) == 3.0
    assert parse_retry_after({"retry-after": "1.5"}, now) == 1.5
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}, now) == 0.25
    date = email.utils.formatdate(now + 12, usegmt=True)
    assert parse_retry_after({"retry-after": date}, now) == pytest.approx(12, abs=1)
    past = email.utils.formatdate(now - 50, usegmt=True)
    assert parse_retry_after({"retry-after": past}, now) == 0.0
    assert parse_retry_after({"retry-after": "soon"}, now) is None
    assert parse_retry_after({"retry-after-ms": "x"}, now) is None
    assert parse_retry_after({}, now) is None


def test_retryable_statuses() -> None:
    assert [s for s in (200, 400, 401, 408, 409, 429, 500, 502, 503, 504) if is_retryable(s)] == [
        408,
        429,
        500,
        502,
        503,
        504,
    ]
    assert is_retryable(None)
