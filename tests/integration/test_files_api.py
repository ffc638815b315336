"""The Files API through the official SDK, every answer checked against OpenAI's schema."""

from __future__ import annotations

import json
import urllib.request

import openai
import pytest

from tests.support import Server, assert_schema, jsonl, request_line


def test_upload_retrieve_content_delete(server: Server) -> None:
    client = server.client()
    data = jsonl([request_line(i) for i in range(3)])
    f = client.files.create(file=("input.jsonl", data), purpose="batch")
    assert f.object == "file" and f.status == "processed" and f.purpose == "batch"
    assert f.bytes == len(data) and f.filename == "input.jsonl"
    assert f.id.startswith("file-")
    assert f.expires_at == f.created_at + 30 * 86400
    assert client.files.retrieve(f.id).model_dump() == f.model_dump()
    assert client.files.content(f.id).content == data
    assert client.files.wait_for_processing(f.id).status == "processed"
    deleted = client.files.delete(f.id)
    assert deleted.deleted is True and deleted.id == f.id
    with pytest.raises(openai.NotFoundError) as exc:
        client.files.retrieve(f.id)
    assert exc.value.status_code == 404
    with pytest.raises(openai.NotFoundError):
        client.files.content(f.id)
    with pytest.raises(openai.NotFoundError):
        client.files.delete(f.id)


@pytest.mark.backends("sqlite")
def test_bytes_upload_gets_default_filename_and_other_purposes(server: Server) -> None:
    client = server.client()
    f = client.files.create(file=b"hello", purpose="user_data")
    assert f.filename == "upload" and f.expires_at is None and f.bytes == 5


@pytest.mark.backends("sqlite")
def test_expires_after_bracket_fields(server: Server) -> None:
    client = server.client()
    f = client.files.create(
        file=("a.jsonl", b"{}\n"), purpose="batch", expires_after={"anchor": "created_at", "seconds": 3600}
    )
    assert f.expires_at == f.created_at + 3600
    with pytest.raises(openai.BadRequestError) as exc:
        client.files.create(
            file=("a.jsonl", b"{}\n"), purpose="batch", expires_after={"anchor": "created_at", "seconds": 10}
        )
    assert exc.value.param == "expires_after.seconds"


@pytest.mark.backends("sqlite")
def test_batch_purpose_needs_jsonl(server: Server) -> None:
    client = server.client()
    with pytest.raises(openai.BadRequestError) as exc:
        client.files.create(file=("input.csv", b"a,b"), purpose="batch")
    assert "Must be .jsonl" in exc.value.message
    assert exc.value.type == "invalid_request_error"
    assert client.files.list().data == []


@pytest.mark.backends("sqlite")
def test_bad_purpose_and_missing_fields(server: Server) -> None:
    client = server.client()
    with pytest.raises(openai.BadRequestError) as exc:
        client.files.create(file=("a.jsonl", b"x"), purpose="nonsense")  # type: ignore[arg-type]
    assert exc.value.param == "purpose" and exc.value.code == "invalid_value"
    body = b'--XX\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--XX--\r\n'
    req = urllib.request.Request(
        server.base_url + "/files",
        data=body,
        headers={"Content-Type": "multipart/form-data; boundary=XX"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as http_exc:
        urllib.request.urlopen(req)
    err = json.loads(http_exc.value.read())
    assert http_exc.value.code == 400
    assert err["error"]["code"] == "missing_required_parameter" and err["error"]["param"] == "file"
    assert_schema("ErrorResponse", err)


@pytest.mark.backends("sqlite")
def test_file_part_before_purpose_is_accepted(server: Server) -> None:
    """Clients other than the SDK may send the file first; it is still checked."""
    body = (
        b'--XX\r\nContent-Disposition: form-data; name="file"; filename="x.jsonl"\r\n'
        b'Content-Type: application/octet-stream\r\n\r\n{"a": 1}\n\r\n'
        b'--XX\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--XX--\r\n'
    )
    req = urllib.request.Request(
        server.base_url + "/files",
        data=body,
        headers={"Content-Type": "multipart/form-data; boundary=XX"},
        method="POST",
    )
    with urllib.request.urlopen(req) as r:
        f = json.loads(r.read())
        assert r.headers["x-request-id"].startswith("req_")
    assert_schema("OpenAIFile", f)
    assert f["bytes"] == len(b'{"a": 1}\n') and f["filename"] == "x.jsonl"


def test_list_pagination_order_and_after_last(server: Server) -> None:
    client = server.client()
    ids = [client.files.create(file=(f"f{i}.jsonl", b"{}\n"), purpose="batch").id for i in range(5)]
    client.files.create(file=b"x", purpose="user_data")
    page = client.files.list(limit=2, purpose="batch")
    assert [f.id for f in page.data] == ids[::-1][:2]
    assert page.has_more is True
    assert [f.id for f in client.files.list(limit=2, purpose="batch")] == ids[::-1]  # auto-paging
    asc = client.files.list(order="asc", purpose="batch", limit=3)
    assert [f.id for f in asc.data] == ids[:3]
    last = client.files.list(after=ids[0], purpose="batch")
    assert last.data == [] and last.has_more is False
    full = client.files.list(purpose="batch")
    assert full.has_more is False and len(full.data) == 5
    raw = client.files.with_raw_response.list(limit=2, purpose="batch").http_response.json()
    assert raw["first_id"] == ids[4] and raw["last_id"] == ids[3]
    with pytest.raises(openai.BadRequestError) as exc:
        client.files.list(limit=0)
    assert exc.value.param == "limit"


@pytest.mark.backends("sqlite")
def test_unknown_route_and_bad_json_use_the_envelope(server: Server) -> None:
    req = urllib.request.Request(server.base_url + "/nope")
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req)
    body = json.loads(exc.value.read())
    assert exc.value.code == 404 and set(body["error"]) == {"message", "type", "param", "code"}
    req = urllib.request.Request(
        server.base_url + "/batches",
        data=b"{not json",
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req)
    body = json.loads(exc.value.read())
    assert exc.value.code == 400 and body["error"]["type"] == "invalid_request_error"
