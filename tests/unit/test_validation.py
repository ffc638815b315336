"""Line splitting and validation on a real local blob store."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from batchd.blobs import BlobStore
from batchd.ingest.lines import clean, iter_lines, split_block
from batchd.ingest.validate import LineChecker, validate_file


def line(cid: str, model: str = "m", **body: object) -> str:
    return json.dumps(
        {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": {"model": model, **body}}
    )


def test_clean_and_split() -> None:
    assert clean(b"\xef\xbb\xbf{}\r", True) == b"{}"
    assert clean(b"\xef\xbb\xbf{}", False) == b"\xef\xbb\xbf{}"
    assert clean(b"  \r", False) is None
    assert list(split_block(b"a\nbb\nc", 10)) == [(10, 12, b"a"), (12, 15, b"bb"), (15, 16, b"c")]


def test_iter_lines_across_read_boundaries(tmp_path: Path) -> None:
    blobs = BlobStore.local(tmp_path)
    data = b"".join(b"x" * (i % 700) + b"\n" for i in range(5000)) + b"tail"

    async def run() -> list[tuple[int, int, bytes]]:
        await blobs.put("f", data)
        return [item async for item in iter_lines(blobs, "f")]

    items = asyncio.run(run())
    assert len(items) == 5001 and items[-1][2] == b"tail"
    for start, end, raw in items:
        assert data[start:end].rstrip(b"\n") == raw


def test_checker_collects_up_to_cap() -> None:
    checker = LineChecker("/v1/chat/completions", max_lines=100, max_errors=2)
    assert checker.check(1, line("a").encode())
    assert not checker.check(2, b"nope")
    assert not checker.check(3, line("a").encode())
    assert not checker.check(4, b"[]")
    assert [e["line"] for e in checker.plan.errors] == [2, 3]
    assert checker.full


def test_validate_plans_chunks_with_byte_ranges(tmp_path: Path) -> None:
    blobs = BlobStore.local(tmp_path)
    text = "\n".join(line(f"r{i}") for i in range(25)) + "\n\n"

    async def run() -> object:
        await blobs.put("in", text.encode())
        return await validate_file(
            blobs, "in", endpoint="/v1/chat/completions", chunk_lines=10, max_lines=100, max_errors=10
        )

    plan = asyncio.run(run())
    assert plan.errors == [] and plan.total == 25 and plan.model == "m"  # type: ignore[attr-defined]
    chunks = plan.chunks  # type: ignore[attr-defined]
    assert [c["line_count"] for c in chunks] == [10, 10, 5]
    assert [c["first_line"] for c in chunks] == [1, 11, 21]
    data = text.encode()
    first = data[chunks[1]["byte_start"] : chunks[1]["byte_end"]].splitlines()
    assert json.loads(first[0])["custom_id"] == "r10" and len(first) == 10


def test_validate_empty_and_too_many(tmp_path: Path) -> None:
    blobs = BlobStore.local(tmp_path)

    async def run(data: bytes, max_lines: int) -> list[str]:
        await blobs.put("x", data)
        plan = await validate_file(
            blobs, "x", endpoint="/v1/chat/completions", chunk_lines=10, max_lines=max_lines, max_errors=10
        )
        return [e["code"] for e in plan.errors]

    assert asyncio.run(run(b"", 10)) == ["empty_file"]
    assert asyncio.run(run(b"\r\n \n", 10)) == ["empty_file"]
    many = ("\n".join(line(f"r{i}") for i in range(4))).encode()
    assert asyncio.run(run(many, 3)) == ["too_many_tasks"]
    assert asyncio.run(run(b"\xff\xfe{}\n", 3)) == ["invalid_json_line"]
