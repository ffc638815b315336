"""The HTTP edge: body size and JSON nesting limits, stalled and abandoned bodies, the key
checked before the body, and uploads through /v1/uploads counted against the byte quota."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx2 as httpx
import openai
import pytest

from batchd.testing.fake_upstream import FakeUpstreamHandle
from tests.integration.test_tenancy import client, new_key_in_process, raw, wait_auth_on
from tests.support import Server, assert_schema, jsonl, request_line, wait_until

CREATE = "/batches"


def _post(server: Server, path: str, body: bytes, key: str | None = None, **headers: str) -> httpx.Response:
    h = {"content-type": "application/json", **headers}
    if key:
        h["authorization"] = f"Bearer {key}"
    r = httpx.post(server.base_url + path, content=body, headers=h, timeout=30)
    assert r.headers.get("x-request-id")
    if r.status_code >= 400:
        assert_schema("ErrorResponse", r.json())
    return r


def _error(r: httpx.Response) -> tuple[int, str | None]:
    return r.status_code, r.json()["error"]["code"]


@pytest.fixture
def edge_server(make_server: Callable[..., Server], fake_upstream: FakeUpstreamHandle) -> Server:
    return make_server(
        fake_upstream.base_url,
        batchd_max_request_bytes="20000",
        batchd_max_json_depth="8",
        batchd_body_idle_timeout="1",
    )


@pytest.mark.backends("sqlite")
def test_json_body_size_nesting_and_encoding(edge_server: Server) -> None:
    s = edge_server
    # Size: declared and undeclared (chunked) bodies over the limit; never read into memory whole.
    assert _error(_post(s, CREATE, b'{"a": "' + b"x" * 30_000 + b'"}')) == (413, "request_too_large")
    chunks = iter([b'{"a": "', b"x" * 15_000, b"x" * 15_000, b'"}'])
    r = httpx.post(s.base_url + CREATE, content=chunks, headers={"content-type": "application/json"})
    assert _error(r) == (413, "request_too_large") and "BATCHD_MAX_REQUEST_BYTES" in r.text
    # Nesting: 8 levels pass the edge (and reach the route's own checks); 9 do not; nor do
    # 100,000 (past orjson's own limit); brackets inside strings do not count.
    ok = b'{"input_file_id": "file-x", "endpoint": "/v1/chat/completions", "completion_window": "24h", '
    assert _error(_post(s, CREATE, ok + b'"z": ' + b"[" * 7 + b"]" * 7 + b"}")) == (404, None)
    assert _error(_post(s, CREATE, ok + b'"z": "' + b"[" * 50 + b'"}')) == (404, None)
    assert _error(_post(s, CREATE, ok + b'"z": ' + b"[" * 8 + b"]" * 8 + b"}")) == (400, "json_too_deep")
    assert _error(_post(s, CREATE, b'{"a":' * 9 + b"1" + b"}" * 9)) == (400, "json_too_deep")
    assert _error(_post(s, CREATE, b"[" * 10_000 + b"]" * 10_000)) == (400, "json_too_deep")
    # Encoding, syntax and numbers: each a 400 invalid_json, never FastAPI's generic message.
    for body in (b'{"input_file_id": "\xff"}', b"{nope", b'{"bytes": ' + b"9" * 5000 + b"}", b"NaN"):
        assert _error(_post(s, CREATE, body)) == (400, "invalid_json"), body[:40]
    r = _post(s, "/uploads", b'{"filename": "a.jsonl", "purpose": "batch", "mime_type": "x", "bytes": 1e400}')
    assert _error(r) == (400, "invalid_json")
    r = _post(s, "/uploads", b'{"filename": "a.jsonl", "purpose": "batch", "mime_type": "x", "bytes": 1e30}')
    assert r.status_code == 400 and r.json()["error"]["param"] == "bytes"
    # Routes without a body still answer; uploads keep their own (larger) limit.
    assert s.client().files.list().data == []
    big = jsonl([request_line(i, messages=[{"role": "user", "content": "y" * 1000}]) for i in range(40)])
    assert len(big) > 20_000
    assert s.client().files.create(file=("big.jsonl", big), purpose="batch").bytes == len(big)


def _multipart_head(name: str = "file") -> bytes:
    return (
        b'--XX\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        b'--XX\r\nContent-Disposition: form-data; name="' + name.encode() + b'"; filename="s.jsonl"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n"
    )


def _staging(server: Server) -> list[Path]:
    return [p for p in (server.data_dir / "blobs").rglob("*") if p.is_file() and "#" in p.name]


def _read_all(sock: socket.socket, deadline: float) -> bytes:
    sock.settimeout(max(0.1, deadline - time.monotonic()))
    out = b""
    while True:
        data = sock.recv(65536)
        if not data:
            return out
        out += data


def test_stalled_or_abandoned_upload_leaves_nothing(edge_server: Server, backend: dict[str, str]) -> None:
    s = edge_server
    c = s.client()
    sent = 0
    with socket.create_connection(("127.0.0.1", s.port)) as sock:
        sock.sendall(
            b"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=XX\r\n"
            b"Content-Length: %d\r\n\r\n" % (64 * 1024 * 1024)
        )
        sock.sendall(_multipart_head())
        line = b'{"custom_id": "x"}\n' * 50_000
        while sent < 12 * 1024 * 1024:  # past the blob writer's 8 MiB buffer: a staging file exists
            sock.sendall(line)
            sent += len(line)
        started = time.monotonic()
        assert c.files.list().data == []  # the server serves others while the upload stalls
        reply = _read_all(sock, started + 20)  # then it answers 408 and closes the connection
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"request_timeout" in reply and b"BATCHD_BODY_IDLE_TIMEOUT" in reply
    assert b"connection: close" in reply.lower()
    assert c.files.list().data == []
    if backend["BATCHD_TEST_BACKEND"] == "sqlite":
        assert _staging(s) == [] and not list((s.data_dir / "blobs").rglob("file-*"))

    # A client that goes away mid-body: the server drops the staging file at once (no janitor).
    with socket.create_connection(("127.0.0.1", s.port)) as sock:
        sock.sendall(
            b"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=XX\r\n"
            b"Content-Length: %d\r\n\r\n" % (64 * 1024 * 1024)
        )
        sock.sendall(_multipart_head())
        for _ in range(12):
            sock.sendall(line)
        if backend["BATCHD_TEST_BACKEND"] == "sqlite":
            wait_until(lambda: _staging(s), 20, what="a staging file")
    if backend["BATCHD_TEST_BACKEND"] == "sqlite":
        wait_until(lambda: not _staging(s), 20, what="the staging file to go")
        assert not list((s.data_dir / "blobs").rglob("file-*"))
    assert c.files.list().data == []


@pytest.mark.backends("sqlite")
def test_stalled_json_body_and_stalled_part(edge_server: Server) -> None:
    s = edge_server
    with socket.create_connection(("127.0.0.1", s.port)) as sock:
        sock.sendall(
            b"POST /v1/batches HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 500\r\n\r\n{"input_file_id": '
        )
        reply = _read_all(sock, time.monotonic() + 20)
    assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply
    c = s.client()
    up = c.uploads.create(bytes=100, filename="p.jsonl", mime_type="text/jsonl", purpose="batch")
    with socket.create_connection(("127.0.0.1", s.port)) as sock:
        sock.sendall(
            b"POST /v1/uploads/%s/parts HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: multipart/form-data; boundary=XX\r\nContent-Length: 5000\r\n\r\n" % up.id.encode()
        )
        sock.sendall(_multipart_head("data") + b"0123456789")
        reply = _read_all(sock, time.monotonic() + 20)
    assert reply.startswith(b"HTTP/1.1 408")
    with pytest.raises(openai.BadRequestError, match="does not belong"):
        c.uploads.complete(up.id, part_ids=["part_none"])
    assert not [p for p in (s.data_dir / "blobs").rglob("*") if p.is_file() and "uploads" in p.parts]


@pytest.mark.backends("sqlite")
def test_key_is_checked_before_the_body(
    make_server: Callable[..., Server], fake_upstream: FakeUpstreamHandle
) -> None:
    s = make_server(fake_upstream.base_url, batchd_max_request_bytes="1000")
    key = new_key_in_process(s, "alpha")
    wait_auth_on(s)
    for body in (b"{nope", b"[" * 5000, b"x" * 5000, b'{"a": "\xff"}'):
        for path in (CREATE, "/uploads", "/uploads/upload_x/complete", "/admin/keys", "/nope"):
            assert _error(_post(s, path, body)) == (401, "invalid_api_key"), (path, body[:10])
    assert _error(_post(s, "/files", b"--XX--", **{"content-type": "multipart/form-data; boundary=XX"})) == (
        401,
        "invalid_api_key",
    )
    assert _error(_post(s, CREATE, b"{nope", key)) == (400, "invalid_json")
    assert _error(_post(s, CREATE, b"x" * 5000, key)) == (413, "request_too_large")
    assert raw(s, "GET", "/files", key).status_code == 200


@pytest.mark.backends("sqlite")
def test_uploads_count_against_the_byte_quota(
    make_server: Callable[..., Server], fake_upstream: FakeUpstreamHandle
) -> None:
    s = make_server(fake_upstream.base_url, batchd_quota_max_stored_bytes="3000")
    c = client(s, None)
    with pytest.raises(openai.RateLimitError) as exc:
        c.uploads.create(bytes=5000, filename="a.jsonl", mime_type="text/jsonl", purpose="batch")
    assert exc.value.body["param"] == "max_stored_bytes"  # type: ignore[index]
    data = b"z" * 2000
    up = c.uploads.create(bytes=len(data), filename="a.jsonl", mime_type="text/jsonl", purpose="batch")
    part = c.uploads.parts.create(up.id, data=data)
    other = c.uploads.create(bytes=900, filename="b.jsonl", mime_type="text/jsonl", purpose="batch")
    # The first upload's part already holds 2000 bytes: 1500 more would pass 3000.
    with pytest.raises(openai.RateLimitError):
        c.uploads.parts.create(other.id, data=b"q" * 1500)
    c.uploads.parts.create(other.id, data=b"q" * 900)
    done = c.uploads.complete(up.id, part_ids=[part.id])
    assert done.status == "completed" and done.file is not None and done.file.bytes == 2000
    # Now the completed file (2000) and the pending part (900) hold 2900 bytes.
    with pytest.raises(openai.RateLimitError):
        c.uploads.create(bytes=200, filename="c.jsonl", mime_type="text/jsonl", purpose="batch")
    with pytest.raises(openai.RateLimitError):
        c.files.create(file=("d.jsonl", b"w" * 200), purpose="batch")
    c.uploads.cancel(other.id)
    c.files.create(file=("d.jsonl", b"w" * 200), purpose="batch")
