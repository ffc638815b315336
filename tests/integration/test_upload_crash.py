"""A killed upload leaves no file object, and its bytes do not outlive the next start."""

from __future__ import annotations

import signal
import socket
from pathlib import Path
from typing import Any

import pytest

from batchd.testing.fake_upstream import FakeUpstreamHandle
from tests.support import wait_until


def _staging_files(blob_dir: Path) -> list[Path]:
    return [p for p in blob_dir.rglob("*#*") if p.is_file()]


@pytest.mark.backends("sqlite")  # staging files are a local-directory matter; S3 parts are never visible
def test_killed_upload_leaves_nothing(make_server: Any, fake_upstream: FakeUpstreamHandle) -> None:
    env = {"batchd_orphan_grace": "0"}
    server = make_server(fake_upstream.base_url, name="data", **env)
    blob_dir = server.data_dir / "blobs"
    head = (
        b'--XX\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        b'--XX\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n"
    )
    declared = 100 * 1024 * 1024
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(
            b"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=XX\r\n"
            b"Content-Length: %d\r\n\r\n" % declared
        )
        sock.sendall(head)
        chunk = b'{"custom_id": "x"}\n' * 50_000
        for _ in range(30):  # ~28 MB: past the writer's in-memory buffer, into a staging file
            sock.sendall(chunk)
        wait_until(lambda: _staging_files(blob_dir), 30, what="a staging file")
        server.stop(signal.SIGKILL)
    # A crash between storing an upload's bytes and inserting its row leaves a blob like this:
    orphan = blob_dir / "files" / "file-orphanedbytes"
    orphan.write_bytes(b"{}\n")

    server = make_server(fake_upstream.base_url, name="data", **env)
    client = server.client()
    assert client.files.list().data == []
    wait_until(lambda: not _staging_files(blob_dir) and not orphan.exists(), 30, what="the janitor")
    kept = client.files.create(file=("ok.jsonl", b"{}\n"), purpose="batch")
    assert client.files.content(kept.id).content == b"{}\n"
