"""``/v1/files``: upload (streamed to storage), list, retrieve, content, delete."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from batchd import protocol as p
from batchd.api.deps import BlobsDep, ProjectDep, SettingsDep, StoreDep
from batchd.api.presenters import file_object
from batchd.blobs import BlobStore, BlobWriter
from batchd.errors import BatchdError, InvalidRequest, MissingParameter, NotFound, PayloadTooLarge
from batchd.ids import file_id
from batchd.ingest.multipart import MAX_FIELD_BYTES, PartStart, iter_multipart

router = APIRouter(tags=["files"])


def not_found(file_id_: str) -> NotFound:
    return NotFound(f"No such File object: {file_id_}", param="file_id")


def _check_purpose(fields: dict[str, str]) -> str:
    purpose = fields.get("purpose")
    if not purpose:
        raise MissingParameter("purpose")
    if purpose not in p.UPLOAD_PURPOSES:
        raise InvalidRequest(
            f"Invalid purpose '{purpose[:100]}'; expected one of {', '.join(p.UPLOAD_PURPOSES)}.",
            param="purpose",
            code="invalid_value",
        )
    return purpose


def _check_filename(purpose: str, filename: str) -> None:
    if purpose == "batch" and not filename.lower().endswith(".jsonl"):
        raise InvalidRequest("Invalid file format for Batch API. Must be .jsonl", param="file")


def _expires_at(fields: dict[str, str], purpose: str, now: int) -> int | None:
    anchor = fields.get("expires_after[anchor]")
    seconds = fields.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return now + p.BATCH_INPUT_TTL if purpose == "batch" else None
    if anchor != "created_at":
        raise InvalidRequest(
            "expires_after[anchor] must be 'created_at'.", param="expires_after.anchor", code="invalid_value"
        )
    try:
        value = int(seconds or "")
    except ValueError:
        value = -1
    if not p.MIN_EXPIRES_AFTER <= value <= p.MAX_EXPIRES_AFTER:
        raise InvalidRequest(
            f"expires_after[seconds] must be an integer from {p.MIN_EXPIRES_AFTER} to {p.MAX_EXPIRES_AFTER}.",
            param="expires_after.seconds",
            code="invalid_value",
        )
    return now + value


async def _discard(blobs: BlobStore, writer: BlobWriter) -> None:
    with contextlib.suppress(BatchdError, OSError):
        await writer.close()
    with contextlib.suppress(BatchdError, OSError):
        await blobs.delete(writer.key)


async def _receive(
    request: Request, blobs: BlobStore, key: str, max_bytes: int
) -> tuple[dict[str, str], BlobWriter, str]:
    """Stream the multipart body: small fields into a dict, the file part into storage."""
    fields: dict[str, str] = {}
    writer: BlobWriter | None = None
    filename = "upload"
    part: PartStart | None = None
    buf = bytearray()
    try:
        async for kind, payload in iter_multipart(request):
            if kind == "start":
                part, buf = payload, bytearray()
                if part.name == "file":
                    if writer is not None:
                        raise InvalidRequest("Send exactly one 'file' part.", param="file")
                    filename = part.filename or "upload"
                    if "purpose" in fields:
                        _check_filename(_check_purpose(fields), filename)
                    writer = blobs.writer(key)
            elif kind == "data" and part is not None and part.name == "file" and writer is not None:
                await writer.write(payload)
                if writer.size > max_bytes:
                    raise PayloadTooLarge(
                        f"The file is larger than {max_bytes} bytes, the most this server takes "
                        "(setting BATCHD_MAX_FILE_BYTES).",
                        param="file",
                        code="file_too_large",
                    )
            elif kind == "data":
                buf += payload
                if len(buf) > MAX_FIELD_BYTES:
                    raise InvalidRequest("A form field is too large.", param=part.name if part else None)
            elif kind == "end" and part is not None and part.name != "file":
                fields[part.name] = buf.decode("utf-8", "replace")
        if writer is None:
            raise MissingParameter("file")
        await writer.close()
    except BaseException:
        if writer is not None:
            await _discard(blobs, writer)
        raise
    return fields, writer, filename


@router.post("/files", response_model=p.FileObject)
async def create_file(
    request: Request, store: StoreDep, blobs: BlobsDep, settings: SettingsDep, project: ProjectDep
) -> p.FileObject:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > settings.max_file_bytes + MAX_FIELD_BYTES:
        raise PayloadTooLarge(
            f"The upload is larger than {settings.max_file_bytes} bytes, the most this server takes "
            "(setting BATCHD_MAX_FILE_BYTES).",
            param="file",
            code="file_too_large",
        )
    fid = file_id()
    key = f"files/{fid}"
    fields, writer, filename = await _receive(request, blobs, key, settings.max_file_bytes)
    now = int(time.time())
    try:
        purpose = _check_purpose(fields)
        _check_filename(purpose, filename)
        expires_at = _expires_at(fields, purpose, now)
        row = await store.insert_file(
            id=fid,
            project=project,
            filename=filename,
            purpose=purpose,
            bytes=writer.size,
            created_at=now,
            expires_at=expires_at,
            blob_key=key,
            sha256=writer.sha256,
            batch_id=None,
            stream=None,
        )
    except BaseException:
        await blobs.delete(key)
        raise
    return file_object(row)


@router.get("/files", response_model=p.FileList)
async def list_files(
    store: StoreDep,
    project: ProjectDep,
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
) -> p.FileList:
    page = await store.list_files(project, purpose=purpose, limit=limit, order=order, after=after)
    if page is None:
        raise InvalidRequest(f"No such File object for 'after': {after}", param="after", code="invalid_value")
    rows, has_more = page
    data = [file_object(r) for r in rows]
    return p.FileList(
        data=data,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        has_more=has_more,
    )


@router.get("/files/{file_id}", response_model=p.FileObject)
async def retrieve_file(file_id: str, store: StoreDep, project: ProjectDep) -> p.FileObject:
    row = await store.get_file(project, file_id)
    if row is None:
        raise not_found(file_id)
    return file_object(row)


@router.delete("/files/{file_id}", response_model=p.FileDeleted)
async def delete_file(file_id: str, store: StoreDep, project: ProjectDep) -> p.FileDeleted:
    if not await store.delete_file(project, file_id, int(time.time())):
        raise not_found(file_id)
    return p.FileDeleted(id=file_id)


@router.get(
    "/files/{file_id}/content",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
async def file_content(
    file_id: str, store: StoreDep, blobs: BlobsDep, project: ProjectDep
) -> StreamingResponse:
    row = await store.get_file(project, file_id)
    if row is None:
        raise not_found(file_id)
    if row["blob_key"]:
        pieces = [(row["blob_key"], row["bytes"])]
    else:
        pieces = await store.view_parts(row["batch_id"], row["stream"])
    return StreamingResponse(
        _stream(blobs, pieces),
        media_type="application/octet-stream",
        headers={
            "content-length": str(row["bytes"]),
            "content-disposition": f'attachment; filename="{_safe_name(row["filename"])}"',
        },
    )


async def _stream(blobs: BlobStore, pieces: list[tuple[str, int]]) -> AsyncIterator[bytes]:
    for key, size in pieces:
        if size:
            async for data in blobs.stream(key):
                yield data


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)[:200] or "file"


