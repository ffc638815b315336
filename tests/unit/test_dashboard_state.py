"""Error codes for the dashboard: which code an error line counts under, and the per-part cache
with its byte budget (each immutable part read once; a poll reads a bounded amount)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from batchd.api.dashboard_state import ErrorCodeCounter, line_code
from batchd.blobs import BlobStore


def http_line(status: int, code: str | None) -> bytes:
    body = {"error": {"message": "x", "type": "t", "param": None, "code": code}} if code else {"detail": "x"}
    obj = {"id": "r", "custom_id": "c", "response": {"status_code": status, "request_id": "q", "body": body}}
    return json.dumps({**obj, "error": None}).encode()


def test_line_code() -> None:
    expired = {"id": "r", "custom_id": "c", "response": None, "error": {"code": "batch_expired"}}
    assert line_code(json.dumps(expired).encode()) == "batch_expired"
    assert line_code(http_line(429, "rate_limit_exceeded")) == "rate_limit_exceeded"
    assert line_code(http_line(502, None)) == "http_502"
    assert line_code(b"{not json") == "unreadable_line"
    assert line_code(b"[1, 2]") == "unreadable_line"


def test_counter_reads_each_part_once_within_a_budget(tmp_path: Path) -> None:
    blobs = BlobStore.local(tmp_path)
    small = b"\n".join([http_line(400, "fake_error")] * 3 + [http_line(500, None)]) + b"\n"
    big = b"\n".join([http_line(400, "big")] * 50) + b"\n"

    async def run() -> None:
        await blobs.put("p1", small)
        await blobs.put("p2", big)
        parts = [("b1", "p1", len(small)), ("b2", "p2", len(big))]
        counter = ErrorCodeCounter()
        codes, partial = await counter.by_batch(blobs, parts, budget=len(small) + 10)
        assert partial is True and codes == {"b1": {"fake_error": 3, "http_500": 1}}
        codes, partial = await counter.by_batch(blobs, parts, budget=len(big))
        assert partial is False and codes["b2"] == {"big": 50} and codes["b1"]["fake_error"] == 3
        await blobs.delete("p1")  # cached: not read again
        codes, _ = await counter.by_batch(blobs, parts, budget=0)
        assert codes["b1"] == {"fake_error": 3, "http_500": 1}
        # A part purged before it was ever read is skipped, not an error.
        codes, partial = await counter.by_batch(blobs, [("b3", "gone", 10)])
        assert codes == {} and partial is False

    asyncio.run(run())
