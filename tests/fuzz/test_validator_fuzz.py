"""Hypothesis against the line validator directly: fast, many examples. Every line gets
exactly the documented error (or none), never an exception; arbitrary bytes never crash it;
line splitting is exact whatever the read boundaries and however long the lines."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from batchd.ingest.depth import json_depth_exceeds
from batchd.ingest.lines import iter_lines
from batchd.ingest.validate import MAX_LINE_DEPTH, LineChecker
from tests.fuzz.strategies import ENDPOINT, LINE_CODES, Line, expected_errors, hostile_file


def check_all(lines: list[Line]) -> list[tuple[str, int, str | None]]:
    checker = LineChecker(ENDPOINT, max_lines=10_000, max_errors=10_000)
    for n, line in enumerate(lines, 1):
        checker.check(n, line.raw)
    return [(e["code"], e["line"], e["param"]) for e in checker.plan.errors]


@settings(max_examples=200, deadline=None)
@given(hostile_file(max_lines=12))
def test_each_hostile_line_gets_its_documented_error(lines: list[Line]) -> None:
    got = check_all(lines)
    want = expected_errors(lines)
    # Lines without a param expectation (json errors) compare on code and line only.
    assert [(c, n) for c, n, _ in got] == [(c, n) for c, n, _ in want]
    for (_, _, gp), (_, _, wp) in zip(got, want, strict=True):
        assert wp is None or gp == wp


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(raw: bytes) -> None:
    checker = LineChecker(ENDPOINT, max_lines=10, max_errors=10)
    ok = checker.check(7, raw)
    errors = checker.plan.errors
    assert ok == (not errors)
    assert all(e["line"] == 7 and e["code"] in LINE_CODES for e in errors)


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none() | st.integers() | st.text(max_size=5),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=3),
        max_leaves=60,
    )
)
def test_depth_measure_matches_a_walk(value: object) -> None:
    def depth(v: object) -> int:
        if isinstance(v, list):
            return 1 + max((depth(x) for x in v), default=0)
        if isinstance(v, dict):
            return 1 + max((depth(x) for x in v.values()), default=0)
        return 0

    text = json.dumps(value).encode()  # escapes, brackets inside strings and all
    d = depth(value)
    assert not json_depth_exceeds(text, d)
    if d:
        assert json_depth_exceeds(text, d - 1)


def test_the_deepest_line_accepted_can_be_sent() -> None:
    """A line at the limit must survive dispatch's re-serialization of its body."""
    body = {"model": "m", "x": 0}
    for _ in range(MAX_LINE_DEPTH - 3):
        body["x"] = [body["x"]]
    line = orjson.dumps({"custom_id": "a", "method": "POST", "url": ENDPOINT, "body": body})
    assert LineChecker(ENDPOINT, 10, 10).check(1, line)
    orjson.dumps(orjson.loads(line)["body"])


class _Pieces:
    """A blob store that hands back one object in the pieces it was given."""

    def __init__(self, pieces: list[bytes]):
        self.pieces = pieces

    async def stream(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        for p in self.pieces:
            yield p


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), min_size=1, max_size=12),
    st.booleans(),
    st.lists(st.integers(1, 30), min_size=1, max_size=40),
    st.integers(0, 25),
)
def test_line_split_is_exact_and_long_lines_are_cut(
    lines: list[bytes], trailing_newline: bool, cuts: list[int], max_line: int
) -> None:
    data = b"\n".join(lines) + (b"\n" if trailing_newline else b"")
    pieces, pos = [], 0
    for c in cuts:
        if pos < len(data):
            pieces.append(data[pos : pos + c])
            pos += c
    if pos < len(data):
        pieces.append(data[pos:])

    async def run() -> list[tuple[int, int, bytes]]:
        return [x async for x in iter_lines(_Pieces(pieces), "k", max_line=max_line)]  # type: ignore[arg-type]

    got = asyncio.run(run())
    want_lines = lines if (trailing_newline or lines[-1]) else lines[:-1]
    if trailing_newline and not data:
        want_lines = []
    assert len(got) == len([x for x in data.split(b"\n")][: len(want_lines)])
    offset = 0
    for (start, end, raw), line in zip(got, want_lines, strict=True):
        assert start == offset and data[start:end].rstrip(b"\n") == line
        if len(line) <= max_line:
            assert raw == line
        else:  # cut or whole, it is long enough to be refused, and never held past the limit
            assert line.startswith(raw) and max_line < len(raw) <= max(max_line + 1, 30 + 40)
        offset = end
