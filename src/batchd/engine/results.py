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
    return value if type(value) is int else 0  # not bool, which is a subclass of int


def usage_of(body: dict[str, Any]) -> Usage:
    """(input, cached, output, reasoning, total) from chat, completions, responses or
    embeddings usage, whichever names the upstream used. Runs once per line: plain lookups."""
    u = body.get("usage")
    if type(u) is not dict:
        return NO_USAGE
    get = u.get
    inp = get("prompt_tokens")
    inp = _int(get("input_tokens") if inp is None else inp)
    out = get("completion_tokens")
    out = _int(get("output_tokens") if out is None else out)
    total = _int(get("total_tokens")) or inp + out
    cached = reasoning = 0
    details = get("prompt_tokens_details") or get("input_tokens_details")
    if type(details) is dict:
        cached = _int(details.get("cached_tokens"))
    details = get("completion_tokens_details") or get("output_tokens_details")
    if type(details) is dict:
        reasoning = _int(details.get("reasoning_tokens"))
    return inp, cached, out, reasoning, total


_OUTPUT_LINE = (
    b'{"id":"%s","custom_id":%s,"response":{"status_code":%d,"request_id":%s,"body":%s},"error":null}\n'
)


def http_result(custom_id: str, resp: UpstreamResponse) -> LineResult:
    """A line for any HTTP answer: 2xx goes to the output file, anything else to the error
    file with the upstream's error inside ``response.body`` and ``error: null``."""
    status = resp.status
    try:
        body = orjson.loads(resp.body)
    except orjson.JSONDecodeError:
        body = None
    request = resp.headers.get("x-request-id") or request_id()
    if isinstance(body, dict):
        ok = 200 <= status < 300
        raw = resp.body
        if b"\n" not in raw and b"\r" not in raw:
            # The hot path: the upstream's bytes are valid JSON (orjson just parsed them) on one
            # line, so they go in as they are instead of being serialised a second time.
            line = _OUTPUT_LINE % (
                request_line_id().encode(),
                orjson.dumps(custom_id),
                status,
                orjson.dumps(request),
                raw,
            )
            return LineResult(ok, line, usage_of(body) if ok else NO_USAGE, http_error=not ok)
    else:
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
            "response": {"status_code": status, "request_id": request, "body": body},
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
