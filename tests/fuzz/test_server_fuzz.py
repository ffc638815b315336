"""Hostile JSONL through the SDK to a real server: never a 500, never a hang, and every line
gets its documented validation error with its line number.

One server per module (SQLite + local directory) keeps the hypothesis loop within ~a minute;
the cases that differ by back end (NUL characters and huge values reaching PostgreSQL columns,
S3 streaming of a 100 MB line) run once on every back end in the tests below the loop.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterator

import openai
import pytest
from hypothesis import HealthCheck, given, settings

from batchd.testing import FakeUpstream
from batchd.testing.fake_upstream import FakeUpstreamHandle
from tests.fuzz.strategies import ENDPOINT, Line, expected_errors, hostile_file
from tests.support import Server, wait_terminal


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with FakeUpstream.start_in_thread(seed=3) as upstream:
        server = Server(tmp_path_factory.mktemp("fuzz") / "data", upstream.base_url).start()
        try:
            yield server
        finally:
            server.stop()


def run_file(
    client: openai.OpenAI, raw: bytes, timeout: float = 30
) -> tuple[str, list[tuple[str, int, str | None]]]:
    f = client.files.create(file=("fuzz.jsonl", raw), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint=ENDPOINT, completion_window="24h")
    done = wait_terminal(client, batch.id, timeout=timeout)  # a deadline: never a hang
    errors = [(e.code, e.line, e.param) for e in (done.errors.data if done.errors else [])]
    return done.status, errors  # type: ignore[return-value]


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
@given(hostile_file(max_lines=6))
def test_hostile_files_get_their_errors_through_the_sdk(fuzz_server: Server, lines: list[Line]) -> None:
    client = fuzz_server.client(max_retries=0)  # a 5xx would raise, not be retried away
    raw = b"\n".join(x.raw for x in lines) + b"\n"
    status, got = run_file(client, raw)
    want = expected_errors(lines)
    if not want:
        assert status == "completed", got
        return
    assert status == "failed"
    assert [(c, n) for c, n, _ in got] == [(c, n) for c, n, _ in want]
    assert all(wp is None or gp == wp for (_, _, gp), (_, _, wp) in zip(got, want, strict=True))


class _LazyLine(io.RawIOBase):
    """One valid line, then a request line of ``size`` bytes made while it is read."""

    def __init__(self, size: int):
        head = json.dumps({"custom_id": "ok", "method": "POST", "url": ENDPOINT, "body": {"model": "m"}})
        big_head = (
            b'{"custom_id": "big", "method": "POST", "url": "' + ENDPOINT.encode() + b'", "body": {"x": "'
        )
        self.parts = [head.encode() + b"\n", big_head]
        self.filler = size - len(big_head) - 3
        self.tail = b'"}}\n'

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        if self.parts:
            data = self.parts.pop(0)
        elif self.filler > 0:
            data = b"y" * min(self.filler, len(buf), 1 << 20)
            self.filler -= len(data)
        else:
            data, self.tail = self.tail, b""
        n = min(len(data), len(buf))
        buf[:n] = data[:n]
        if n < len(data):
            self.parts.insert(0, data[n:])
        return n


def test_a_huge_line_is_refused_with_its_line_number(
    make_server: Callable[..., Server], fake_upstream: FakeUpstreamHandle
) -> None:
    """A huge line, generated while it is uploaded (never in the test's memory): past
    BATCHD_MAX_LINE_BYTES it is ``line_too_long`` at line 2, and validation never holds it whole.

    By default a 5 MB line against a 1 MiB limit (about 2 s). ``BATCHD_TEST_HUGE_LINE_MB=100``
    runs issue 7's real 100 MB line against the default 50 MiB limit: it passes too, but takes
    ~35 s on a shared 2-core machine (the SDK's multipart encoder and the server's parser, not
    validation), too long for every run of the suite."""
    mb = int(os.environ.get("BATCHD_TEST_HUGE_LINE_MB", "5"))
    env = {} if mb >= 60 else {"batchd_max_line_bytes": str(1024 * 1024)}
    server = make_server(fake_upstream.base_url, **env)
    client = server.client(max_retries=0)
    size = mb * 1000 * 1000
    f = client.files.create(file=("huge.jsonl", io.BufferedReader(_LazyLine(size), 1 << 20)), purpose="batch")
    assert f.bytes > size
    batch = client.batches.create(input_file_id=f.id, endpoint=ENDPOINT, completion_window="24h")
    done = wait_terminal(client, batch.id, timeout=120)
    assert done.status == "failed" and done.errors is not None
    assert [(e.code, e.line) for e in done.errors.data] == [("line_too_long", 2)]


def test_hostile_values_reach_every_back_end(
    make_server: Callable[..., Server], fake_upstream: FakeUpstreamHandle
) -> None:
    """NUL characters, huge numbers, deep nesting and duplicate keys: what is stored in the
    database (model, errors, custom ids, filenames, metadata) never gives a 500 or wedges a
    batch. (A NUL in the model used to wedge validation on PostgreSQL.)"""
    server = make_server(fake_upstream.base_url)
    client = server.client(max_retries=0)
    head = b'"method": "POST", "url": "' + ENDPOINT.encode() + b'", "body": {"model": "m"'
    lines = [
        b'{"custom_id": "a\\u0000", ' + head + b', "user": "x\\u0000", "seed": 1' + b"0" * 300 + b"}}",
        b'{"custom_id": "b", "custom_id": "c", ' + head + b', "x": ' + b"[" * 150 + b"]" * 150 + b"}}",
    ]
    status, errors = run_file(client, b"\n".join(lines) + b"\n")
    assert (status, errors) == ("completed", [])
    bad = [
        *lines,
        lines[1],
        b'{"custom_id": "\\u0000", "method": "GET", "url": "x", "body": {"model": "\\u0000"}}',
        b'{"custom_id": "d", ' + head.replace(b'"m"', b'"m\\u0000"') + b"}}",
    ]
    status, errors = run_file(client, b"\n".join(bad) + b"\n")
    assert status == "failed"
    assert [(c, n, p) for c, n, p in errors] == [
        ("duplicate_custom_id", 3, "custom_id"),
        ("invalid_method", 4, "method"),
        ("url_mismatch", 4, "url"),
        ("invalid_value", 4, "body.model"),
        ("invalid_value", 5, "body.model"),
    ]
    f = client.files.create(file=("n\x00ul.jsonl", b"{}\n"), purpose="batch")
    assert "\x00" not in f.filename  # the SDK percent-encodes it; the server would replace it
    with pytest.raises(openai.BadRequestError, match="NUL"):
        client.batches.create(
            input_file_id=f.id, endpoint=ENDPOINT, completion_window="24h", metadata={"k": "v\x00"}
        )
    with pytest.raises(openai.BadRequestError, match="NUL"):
        client.uploads.create(bytes=1, filename="u\x00.jsonl", mime_type="text/jsonl", purpose="batch")
