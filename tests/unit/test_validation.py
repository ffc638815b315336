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
    assert checker.check(1, line("a").encode()) and checker.custom_id == "a" and checker.model == "m"
    assert not checker.check(2, b"nope")
    assert not checker.check(3, line("b", stream=True).encode())
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


def test_parallel_ranges_agree_with_one_process(tmp_path: Path) -> None:
    from batchd.ingest.parallel import validate_parallel

    blobs = BlobStore.local(tmp_path / "blobs")
    rows = [line(f"r{i}") for i in range(400)]
    rows[5] = "{not json"
    rows[250] = line("r3")  # duplicate of line 4, in another range
    rows[300] = line("r300", model="other")  # model mismatch far from the first model
    rows[350] = line("r350", stream=True)
    text = "\ufeff" + "\r\n".join(rows[:200]) + "\r\n\n  \n" + "\n".join(rows[200:])  # no final newline
    data = text.encode()

    async def run(processes: int) -> object:
        await blobs.put("in", data)
        common = {
            "endpoint": "/v1/chat/completions",
            "chunk_lines": 7,
            "max_lines": 1000,
            "max_errors": 50,
            "max_line_bytes": None,
            "id_bound": 50,
        }
        if processes == 1:
            return await validate_file(blobs, "in", spill_dir=tmp_path, **common)  # type: ignore[arg-type]
        return await validate_parallel(
            blobs,
            "in",
            len(data),
            storage_url=None,
            blob_dir=tmp_path / "blobs",
            processes=processes,
            work_dir=tmp_path,
            **common,  # type: ignore[arg-type]
        )

    one = asyncio.run(run(1))
    expected = [
        ("invalid_json_line", 6),
        ("duplicate_custom_id", 253),
        ("model_mismatch", 303),
        ("stream_not_supported", 353),
    ]
    assert [(e["code"], e["line"]) for e in one.errors] == expected  # type: ignore[attr-defined]
    for processes in (2, 3):
        plan = asyncio.run(run(processes))
        assert plan.errors == one.errors and plan.total == 400 and plan.model == "m"  # type: ignore[attr-defined]
        seen = []
        for c in plan.chunks:  # type: ignore[attr-defined]
            lines = [x for x in data[c["byte_start"] : c["byte_end"]].split(b"\n") if x.strip()]
            assert len(lines) == c["line_count"]
            seen.extend(x.removeprefix(b"\xef\xbb\xbf").rstrip(b"\r") for x in lines)
        assert seen == [r.encode() for r in rows]


def test_whole_block_path_plans_like_the_line_path() -> None:
    from batchd.ingest.validate import RangeValidator

    def plan(data: bytes, whole: bool) -> tuple[object, ...]:
        hashes: list[int] = []
        v = RangeValidator(
            "/v1/chat/completions",
            chunk_lines=4,
            max_lines=100,
            max_errors=10,
            max_line_bytes=None,
            at_file_start=True,
            on_ids=hashes.extend,
        )
        if not whole:
            v._feed_whole = lambda block, offset: False  # type: ignore[method-assign]
        half = data.index(b"\n", len(data) // 2) + 1
        assert v.feed(data[:half], 0) and v.feed(data[half:], half)
        r = v.finish()
        return r.lines, r.total, r.chunks, r.models, r.errors, hashes

    rows = [line(f"r{i}") for i in range(11)]
    for data in (
        ("\n".join(rows) + "\n").encode(),
        "\r\n".join(rows).encode(),  # CRLF, no final newline
        ("\ufeff" + "\n".join(rows)).encode(),
    ):
        assert plan(data, whole=True) == plan(data, whole=False)
        total = plan(data, whole=True)
        assert total[1] == 11 and [c["line_count"] for c in total[2]] == [4, 4, 3]  # type: ignore[index]


def test_a_deep_line_in_a_clean_block_is_caught(tmp_path: Path) -> None:
    blobs = BlobStore.local(tmp_path)
    deep = json.dumps(
        {"custom_id": "deep", "method": "POST", "url": "/v1/chat/completions", "body": {"x": [[[]]]}}
    ).replace("[[[]]]", "[" * 250 + "]" * 250)
    text = "\n".join([line("a"), deep, line("b")]) + "\n"

    async def run() -> list[tuple[str, int | None]]:
        await blobs.put("d", text.encode())
        plan = await validate_file(
            blobs, "d", endpoint="/v1/chat/completions", chunk_lines=10, max_lines=100, max_errors=10
        )
        return [(e["code"], e["line"]) for e in plan.errors]

    assert asyncio.run(run()) == [("json_too_deep", 2)]


def test_a_value_split_across_lines_is_not_taken_for_one_line_each(tmp_path: Path) -> None:
    """Two values on one line plus one value over two lines: as many values as newlines, but
    every one of those lines is wrong on its own (dispatch reads lines, not values)."""
    blobs = BlobStore.local(tmp_path)
    split = line("c").replace(', "method"', ',\n"method"')
    text = line("a") + line("b") + "\n" + split + "\n"

    async def run() -> list[tuple[str, int | None]]:
        await blobs.put("s", text.encode())
        plan = await validate_file(
            blobs, "s", endpoint="/v1/chat/completions", chunk_lines=10, max_lines=100, max_errors=10
        )
        return [(e["code"], e["line"]) for e in plan.errors]

    assert asyncio.run(run()) == [("invalid_json_line", n) for n in (1, 2, 3)]


def test_numbers_past_a_float_are_valid_and_sent_as_written(tmp_path: Path) -> None:
    """JSON puts no bound on numbers: validation accepts them on both paths, and dispatch sends
    the body's bytes as the file holds them (a 30-digit id is not turned into a float)."""
    from batchd.engine.chunk_run import BatchInfo
    from batchd.engine.worker import _request_of
    from batchd.ingest.lineshape import custom_id_of

    huge = b"9" * 5000  # past Python's 4300-digit limit for int()
    body = (
        b'{"model": "m", "seed": 123456789012345678901234567890, "t": 1e400, "n": ' + huge + b", "
        b'"max_completion_tokens": 1e400, "max_tokens": 7}'
    )
    raw = b'{"custom_id": "big", "method": "POST", "url": "/v1/chat/completions", "body": ' + body + b"}"
    checker = LineChecker("/v1/chat/completions", max_lines=10, max_errors=10)
    assert checker.check(1, raw) and checker.custom_id == "big"
    assert not checker.check(2, raw.replace(b"1e400", b"NaN"))  # not JSON, whatever Python reads
    blobs = BlobStore.local(tmp_path)

    async def run() -> object:
        await blobs.put("n", raw + b"\n" + raw.replace(b"big", b"big2") + b"\n")
        return await validate_file(
            blobs, "n", endpoint="/v1/chat/completions", chunk_lines=10, max_lines=100, max_errors=10
        )

    plan = asyncio.run(run())
    assert plan.errors == [] and plan.total == 2  # type: ignore[attr-defined]
    batch = BatchInfo("batch_1", "/v1/chat/completions", "/v1/chat/completions", "m", 0, "in")
    request = _request_of(raw + b"\r", batch)
    assert request.custom_id == "big" and request.body == body
    # What finalize (lines never answered) and rerun read of an input line.
    assert custom_id_of(raw) == "big"
    assert request.tokens == len(body) // 4 + 7  # the first limit that is a plain integer


def test_every_custom_id_of_a_repeated_key_must_be_a_string() -> None:
    """The last key wins, but dispatch reads every occurrence: a line whose earlier custom_id
    is not a string is refused at validation, not left to fail when it is sent."""
    checker = LineChecker("/v1/chat/completions", max_lines=10, max_errors=10)

    def repeated(first: str) -> bytes:
        return line("a").replace('{"custom_id"', '{"custom_id": ' + first + ', "custom_id"', 1).encode()

    assert not checker.check(1, repeated("5"))
    assert [(e["code"], e["param"]) for e in checker.plan.errors] == [("invalid_type", "custom_id")]
    assert checker.check(2, repeated('"x"')) and checker.custom_id == "a"


def test_a_last_line_without_newline_ends_its_chunk_at_the_end_of_the_file(tmp_path: Path) -> None:
    """On the line-by-line path (a blank line sends the block there) too."""
    blobs = BlobStore.local(tmp_path)
    data = (line("a") + "\n\n" + line("b")).encode()

    async def run() -> object:
        await blobs.put("f", data)
        return await validate_file(
            blobs, "f", endpoint="/v1/chat/completions", chunk_lines=1, max_lines=10, max_errors=10
        )

    plan = asyncio.run(run())
    assert [(c["byte_start"], c["byte_end"]) for c in plan.chunks] == [  # type: ignore[attr-defined]
        (0, len(line("a")) + 1),
        (len(line("a")) + 2, len(data)),
    ]
