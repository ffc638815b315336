"""Input-file validation: every problem with its line number, and the chunk plan.

Runs after the batch is created (as OpenAI does): a file with any error fails the batch as a
whole and nothing is sent upstream. The file is streamed; memory holds the custom_id set and
the error list (capped), never the file.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import orjson

from batchd.blobs import BlobStore
from batchd.ingest.depth import json_depth_exceeds
from batchd.ingest.lines import clean, iter_lines
from batchd.metrics import VALIDATED_BYTES, VALIDATED_LINES

# Body fields that could steer where a request goes or with which credentials (SDK client
# options some servers honour in a body); a line carrying one fails validation.
FORBIDDEN_BODY_FIELDS = frozenset(
    {
        "api_key",
        "api_base",
        "base_url",
        "api_type",
        "api_version",
        "azure_endpoint",
        "azure_ad_token",
        "extra_headers",
        "extra_query",
        "headers",
        "organization",
        "project",
        "default_headers",
        "default_query",
        "http_client",
        "proxies",
        "proxy",
    }
)


# orjson reads 1024 levels but writes only 254, and dispatch re-serializes each line's body:
# deeper lines are refused here, with their line number, instead of failing when sent.
MAX_LINE_DEPTH = 200


@dataclass
class Plan:
    """What validation learned: errors (if any), line count, the model, and the chunks."""

    errors: list[dict[str, Any]] = field(default_factory=list)
    total: int = 0
    model: str | None = None
    chunks: list[dict[str, int]] = field(default_factory=list)


class LineChecker:
    """Checks one line at a time against the batch; collects errors up to a cap."""

    def __init__(self, endpoint: str, max_lines: int, max_errors: int):
        self.endpoint = endpoint
        self.max_lines = max_lines
        self.max_errors = max_errors
        self.plan = Plan()
        self.seen: set[str] = set()

    @property
    def full(self) -> bool:
        return len(self.plan.errors) >= self.max_errors

    def error(self, code: str, message: str, line: int | None, param: str | None = None) -> None:
        if not self.full:
            self.plan.errors.append({"code": code, "message": message, "param": param, "line": line})

    def check(self, n: int, text: bytes) -> bool:
        """Validate line ``n`` (1-based); True when it is a valid request line."""
        try:
            obj = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            if "depth" in str(exc):
                self.error("json_too_deep", f"This line nests more than {MAX_LINE_DEPTH} levels deep.", n)
            else:
                self.error("invalid_json_line", "This line is not parseable as valid JSON.", n)
            return False
        if not isinstance(obj, dict):
            self.error("invalid_json_line", "This line is valid JSON but not a JSON object.", n)
            return False
        if json_depth_exceeds(text, MAX_LINE_DEPTH):
            self.error("json_too_deep", f"This line nests more than {MAX_LINE_DEPTH} levels deep.", n)
            return False
        return self._check_fields(n, obj)

    def _check_fields(self, n: int, obj: dict[str, Any]) -> bool:
        ok = True
        for name, kind in (("custom_id", str), ("method", str), ("url", str), ("body", dict)):
            if name not in obj or obj[name] is None:
                self.error("missing_required_parameter", f"Missing required parameter: '{name}'.", n, name)
                ok = False
            elif not isinstance(obj[name], kind):
                want = "an object" if kind is dict else "a string"
                self.error("invalid_type", f"'{name}' must be {want}.", n, name)
                ok = False
        if not ok:
            return False
        cid, body = obj["custom_id"], obj["body"]
        if not cid:
            self.error("invalid_value", "'custom_id' must not be empty.", n, "custom_id")
            ok = False
        elif cid in self.seen:
            self.error(
                "duplicate_custom_id", f"The custom_id '{cid[:200]}' appears more than once.", n, "custom_id"
            )
            ok = False
        else:
            self.seen.add(cid)
        if obj["method"] != "POST":
            self.error("invalid_method", "Only the 'POST' method is supported.", n, "method")
            ok = False
        if obj["url"] != self.endpoint:
            self.error(
                "url_mismatch",
                f"The url '{obj['url'][:200]}' does not match the batch endpoint '{self.endpoint}'.",
                n,
                "url",
            )
            ok = False
        for key in body:
            if key in FORBIDDEN_BODY_FIELDS:
                self.error(
                    "forbidden_parameter",
                    f"'body.{key}' is not allowed: a line cannot choose the upstream or its credentials.",
                    n,
                    f"body.{key}",
                )
                ok = False
        if body.get("stream") is True:
            self.error(
                "stream_not_supported",
                "Streaming ('stream': true) is not supported in a batch.",
                n,
                "body.stream",
            )
            ok = False
        return self._check_model(n, body.get("model")) and ok

    def _check_model(self, n: int, model: Any) -> bool:
        if model is None:
            return True
        if not isinstance(model, str):
            self.error("invalid_type", "'body.model' must be a string.", n, "body.model")
            return False
        if "\x00" in model:  # the model is stored in a text column; PostgreSQL refuses NUL
            self.error("invalid_value", "'body.model' must not contain NUL characters.", n, "body.model")
            return False
        if self.plan.model is None:
            self.plan.model = model
        elif model != self.plan.model:
            self.error(
                "model_mismatch",
                f"All lines of a batch must use the same model: this line uses '{model[:200]}', "
                f"earlier lines use '{self.plan.model}'.",
                n,
                "body.model",
            )
            return False
        return True


def _count(lines: int, to: int, counted_lines: int, counted_to: int) -> tuple[int, int]:
    """Add what was validated since the last call to the throughput counters."""
    VALIDATED_LINES.inc(max(0, lines - counted_lines))
    VALIDATED_BYTES.inc(max(0, to - counted_to))
    return lines, to


async def validate_file(
    blobs: BlobStore,
    key: str,
    *,
    endpoint: str,
    chunk_lines: int,
    max_lines: int,
    max_errors: int,
    max_line_bytes: int | None = None,
) -> Plan:
    checker = LineChecker(endpoint, max_lines, max_errors)
    plan = checker.plan
    chunk: dict[str, int] | None = None
    line_no = counted_lines = counted_to = last_end = 0
    async for start, end, raw in iter_lines(blobs, key, max_line=max_line_bytes):
        line_no += 1
        last_end = end
        text = clean(raw, start == 0)
        if text is None:
            continue
        plan.total += 1
        if plan.total > max_lines:
            checker.error(
                "too_many_tasks",
                f"The file has more than {max_lines} requests, the most a batch may hold "
                "(setting BATCHD_MAX_LINES_PER_BATCH).",
                None,
            )
            break
        if max_line_bytes is not None and len(text) > max_line_bytes:
            checker.error(
                "line_too_long",
                f"Line {line_no} has more than {max_line_bytes} bytes, the most a line may hold "
                "(setting BATCHD_MAX_LINE_BYTES).",
                line_no,
            )
            if checker.full:
                break
            continue
        checker.check(line_no, text)
        if checker.full:
            break
        if plan.total % 2000 == 0:
            counted_lines, counted_to = _count(plan.total, end, counted_lines, counted_to)
            await asyncio.sleep(0)  # let dispatch and the API run between slices of a big file
        if chunk is None:
            chunk = {"idx": len(plan.chunks), "first_line": line_no, "line_count": 0, "byte_start": start}
            plan.chunks.append(chunk)
        chunk["line_count"] += 1
        chunk["byte_end"] = end
        if chunk["line_count"] >= chunk_lines:
            chunk = None
    _count(min(plan.total, max_lines), last_end, counted_lines, counted_to)
    if plan.total == 0 and not plan.errors:
        checker.error("empty_file", "The input file has no request lines.", None)
    return plan
