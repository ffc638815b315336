"""Output and error lines, exactly in OpenAI's shape, built with orjson on the hot path."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from batchd.ids import request_id, request_line_id
from batchd.protocol import LINE_ERROR_MESSAGES
from batchd.upstreams.base import UpstreamResponse

Usage = tuple[int, int, int, int, int]
NO_USAGE: Usage = (0, 0, 0, 0, 0)


@dataclass(frozen=True)
class LineResult:
    ok: bool
    line: bytes
    usage: Usage = NO_USAGE
    http_error: bool = False


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def usage_of(body: dict[str, Any]) -> Usage:
    """(input, cached, output, reasoning, total) from chat, completions, responses or
    embeddings usage, whichever names the upstream used."""
    u = body.get("usage")
    if not isinstance(u, dict):
        return NO_USAGE
    inp = _int(u.get("prompt_tokens", u.get("input_tokens")))
    out = _int(u.get("completion_tokens", u.get("output_tokens")))
    total = _int(u.get("total_tokens")) or inp + out
    in_details = u.get("prompt_tokens_details") or u.get("input_tokens_details") or {}
    out_details = u.get("completion_tokens_details") or u.get("output_tokens_details") or {}
    cached = _int(in_details.get("cached_tokens")) if isinstance(in_details, dict) else 0
    reasoning = _int(out_details.get("reasoning_tokens")) if isinstance(out_details, dict) else 0
    return inp, cached, out, reasoning, total


def http_result(custom_id: str, resp: UpstreamResponse) -> LineResult:
    """A line for any HTTP answer: 2xx goes to the output file, anything else to the error
    file with the upstream's error inside ``response.body`` and ``error: null``."""
    status = resp.status
    try:
        body = orjson.loads(resp.body)
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        body = {
            "error": {
                "message": "The upstream answered with a body that is not a JSON object.",
                "type": "upstream_error",
                "param": None,
                "code": "invalid_upstream_response",
            }
        }
        if status < 300:
            status = 502
    ok = 200 <= status < 300
    line = orjson.dumps(
        {
            "id": request_line_id(),
            "custom_id": custom_id,
            "response": {
                "status_code": status,
                "request_id": resp.headers.get("x-request-id") or request_id(),
                "body": body,
            },
            "error": None,
        }
    )
    return LineResult(ok, line + b"\n", usage_of(body) if ok else NO_USAGE, http_error=not ok)


def error_result(custom_id: str, code: str) -> LineResult:
    """A line for a request that got no HTTP answer (or never ran): ``response: null``."""
    line = orjson.dumps(
        {
            "id": request_line_id(),
            "custom_id": custom_id,
            "response": None,
            "error": {"code": code, "message": LINE_ERROR_MESSAGES[code]},
        }
    )
    return LineResult(False, line + b"\n")
