"""The Uploads API through the SDK: chunked upload, completion checks, cancel, limits."""

from __future__ import annotations

import hashlib
from pathlib import Path

import openai
import psutil
import pytest

from tests.support import Server, jsonl, request_line, wait_terminal, wait_until


def _batch_file(tmp_path: Path, n: int = 40) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl([request_line(i) for i in range(n)]))
    return path


def test_chunked_upload_then_a_batch_completes(server: Server, tmp_path: Path) -> None:
    client = server.client()
    path = _batch_file(tmp_path)
    size = path.stat().st_size
    upload = client.uploads.upload_file_chunked(
        file=path, mime_type="text/jsonl", purpose="batch", part_size=size // 4 + 1
    )
    assert upload.status == "completed" and upload.file is not None
    assert upload.file.bytes == size and upload.file.filename == "in.jsonl"
    assert client.files.content(upload.file.id).content == path.read_bytes()
    batch = client.batches.create(
        input_file_id=upload.file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = wait_terminal(client, batch.id)
    assert done.status == "completed" and done.request_counts.completed == 40
    # A completed upload cannot be completed again.
    with pytest.raises(openai.BadRequestError):
        client.uploads.complete(upload.id, part_ids=[])


def test_completion_checks_md5_and_byte_total_then_cancel(server: Server) -> None:
    client = server.client()
    data = jsonl([request_line(i) for i in range(5)])
    up = client.uploads.create(bytes=len(data), filename="x.jsonl", mime_type="text/jsonl", purpose="batch")
    assert up.status == "pending" and up.expires_at == up.created_at + 3600
    a = client.uploads.parts.create(up.id, data=data[:10])
    b = client.uploads.parts.create(up.id, data=data[10:])
    with pytest.raises(openai.BadRequestError, match=f"holds? 10 bytes.*bytes={len(data)}"):
        client.uploads.complete(up.id, part_ids=[a.id])
    with pytest.raises(openai.BadRequestError, match="md5"):
        client.uploads.complete(up.id, part_ids=[a.id, b.id], md5="0" * 32)
    good = hashlib.md5(data).hexdigest()
    # Checks fail without changing the upload: it can still be cancelled, and then not completed.
    cancelled = client.uploads.cancel(up.id)
    assert cancelled.status == "cancelled" and cancelled.file is None
    with pytest.raises(openai.BadRequestError):
        client.uploads.complete(up.id, part_ids=[a.id, b.id], md5=good)


@pytest.mark.backends("sqlite")
def test_unknown_ids_limits_and_part_size(make_server, fake_upstream) -> None:  # type: ignore[no-untyped-def]
    server = make_server(fake_upstream.base_url, batchd_max_file_bytes="1000")
    client = server.client(max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.uploads.cancel("upload_nope")
    with pytest.raises(openai.NotFoundError):
        client.uploads.parts.create("upload_nope", data=b"x")
    with pytest.raises(openai.APIStatusError) as exc:
        client.uploads.create(bytes=1001, filename="x.jsonl", mime_type="text/jsonl", purpose="batch")
    assert exc.value.status_code == 413 and "BATCHD_MAX_FILE_BYTES" in str(exc.value)
    with pytest.raises(openai.APIStatusError) as exc:  # the same limit on POST /v1/files
        client.files.create(file=("big.jsonl", b"x" * 2000), purpose="batch")
    assert exc.value.status_code == 413 and exc.value.code == "file_too_large"
    assert "BATCHD_MAX_FILE_BYTES" in str(exc.value)
    up = client.uploads.create(bytes=10, filename="x.jsonl", mime_type="text/jsonl", purpose="batch")
    other = client.uploads.create(bytes=10, filename="y.jsonl", mime_type="text/jsonl", purpose="batch")
    foreign = client.uploads.parts.create(other.id, data=b"0123456789")
    with pytest.raises(openai.BadRequestError, match="does not belong"):
        client.uploads.complete(up.id, part_ids=[foreign.id])
    with pytest.raises(openai.APIStatusError) as exc:
        client.uploads.parts.create(up.id, data=b"x" * (64 * 1024**2 + 1))
    assert exc.value.status_code == 413


@pytest.mark.backends("sqlite")
def test_a_line_over_max_line_bytes_fails_validation(make_server, fake_upstream) -> None:  # type: ignore[no-untyped-def]
    server = make_server(fake_upstream.base_url, batchd_max_line_bytes="400")
    client = server.client()
    lines = [request_line(0), request_line(1, messages=[{"role": "user", "content": "x" * 500}])]
    f = client.files.create(file=("long.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = wait_terminal(client, batch.id)
    assert done.status == "failed" and done.errors is not None
    [err] = done.errors.data
    assert err.code == "line_too_long" and err.line == 2 and "BATCHD_MAX_LINE_BYTES" in (err.message or "")


def test_a_big_file_is_validated_in_ranges_by_the_servers_processes(  # type: ignore[no-untyped-def]
    make_server, fake_upstream, tmp_path: Path
) -> None:
    """Every file counts as big here: the server's fork server (started with the worker)
    forks two range processes that read the file from the real store (a local file, or S3
    on the pg back end). Errors come back with global line numbers, across the ranges."""
    server = make_server(
        fake_upstream.base_url,
        batchd_parallel_validation_bytes="1",
        batchd_validation_prestart="true",
        batchd_chunk_lines="7",
    )

    def fork_server() -> bool:
        assert server.proc is not None
        kids = psutil.Process(server.proc.pid).children(recursive=True)
        return any("forkserver" in " ".join(k.cmdline()) for k in kids)

    wait_until(fork_server, 30, what="the validation fork server")
    client = server.client()
    path = _batch_file(tmp_path, 300)
    good = client.uploads.upload_file_chunked(file=path, mime_type="text/jsonl", purpose="batch")
    assert good.file is not None
    batch = client.batches.create(
        input_file_id=good.file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = wait_terminal(client, batch.id)
    assert done.status == "completed" and done.request_counts.completed == 300

    rows = [request_line(i) for i in range(300)]
    rows[250] = request_line(3)  # a duplicate of line 4, in the other range
    rows[280] = request_line(280, model="other-model")
    bad = client.files.create(file=("bad.jsonl", jsonl(rows)), purpose="batch")
    batch = client.batches.create(
        input_file_id=bad.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = wait_terminal(client, batch.id)
    assert done.status == "failed" and done.errors is not None
    assert [(e.code, e.line) for e in done.errors.data] == [
        ("duplicate_custom_id", 251),
        ("model_mismatch", 281),
    ]
