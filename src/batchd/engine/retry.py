"""Whether and when to try a request again: a pure decision, tested from a table."""

from __future__ import annotations

import email.utils
from collections.abc import Mapping
from dataclasses import dataclass

RETRY_STATUSES = frozenset({408, 429})
MAX_BACKOFF = 30.0


@dataclass(frozen=True)
class Retry:
    delay: float


@dataclass(frozen=True)
class GiveUp:
    reason: str


def parse_retry_after(headers: Mapping[str, str], now: float) -> float | None:
    """Seconds the upstream asks us to wait: ``retry-after-ms``, then ``retry-after`` as
    seconds or as an HTTP date. None when absent or unreadable."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


def is_retryable(status: int | None) -> bool:
    """None means no HTTP answer at all (connection error or timeout)."""
    return status is None or status in RETRY_STATUSES or status >= 500


def decide(
    *,
    status: int | None,
    attempt: int,
    max_attempts: int,
    retry_after: float | None,
    now: float,
    deadline: float,
    jitter: float,
) -> Retry | GiveUp:
    """``attempt`` counts from 1 (the try that just ended); ``jitter`` is uniform in [0, 1)."""
    if not is_retryable(status):
        return GiveUp("not retryable")
    if attempt >= max_attempts:
        return GiveUp("attempts exhausted")
    if retry_after is not None:
        delay = retry_after
    else:
        delay = min(0.5 * 2 ** (attempt - 1), MAX_BACKOFF) * (0.75 + 0.5 * jitter)
    if now + delay >= deadline:
        return GiveUp("deadline")
    return Retry(delay)
