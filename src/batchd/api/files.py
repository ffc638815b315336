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
from batchd.api.openapi import FILE_UPLOAD_BODY
from batchd.api.presenters import file_object
from batchd.api.quotas import check_quotas
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


def too_large(max_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"The file is larger than {max_bytes} bytes, the most this server takes "
        "(setting BATCHD_MAX_FILE_BYTES).",
        param="file",
        code="file_too_large",
    )


class _Upload:
    """Receives one multipart body: small fields into a dict, the file part into storage."""

    def __init__(self, blobs: BlobStore, key: str, max_bytes: int, idle_timeout: float):
        self.blobs, self.key, self.max_bytes = blobs, key, max_bytes
        self.idle_timeout = idle_timeout
        self.fields: dict[str, str] = {}
        self.writer: BlobWriter | None = None
        self.filename = "upload"
        self._part: PartStart | None = None
        self._buf = bytearray()
        self.newlines = 0
        self.last_byte = b"\n"

    def start(self, part: PartStart) -> None:
        self._part, self._buf = part, bytearray()
        if part.name != "file":
            return
        if self.writer is not None:
            raise InvalidRequest("Send exactly one 'file' part.", param="file")
        # Filenames are data; NUL is replaced because PostgreSQL text cannot hold it.
        self.filename = (part.filename or "upload").replace("\x00", "\ufffd")
        if "purpose" in self.fields:
            _check_filename(_check_purpose(self.fields), self.filename)
        self.writer = self.blobs.writer(self.key)

    async def data(self, payload: bytes) -> None:
        if self._part is not None and self._part.name == "file" and self.writer is not None:
            await self.writer.write(payload)
            if payload:
                self.newlines += payload.count(b"\n")
                self.last_byte = payload[-1:]
            if self.writer.size > self.max_bytes:
                raise too_large(self.max_bytes)
            return
        self._buf += payload
        if len(self._buf) > MAX_FIELD_BYTES:
            raise InvalidRequest("A form field is too large.", param=self._part.name if self._part else None)

    def end(self) -> None:
        if self._part is not None and self._part.name != "file":
            self.fields[self._part.name] = self._buf.decode("utf-8", "replace")

    async def receive(self, request: Request) -> BlobWriter:
        try:
            async for kind, payload in iter_multipart(request, self.idle_timeout):
                if kind == "start":
                    self.start(payload)
                elif kind == "data":
                    await self.data(payload)
                else:
                    self.end()
            if self.writer is None:
                raise MissingParameter("file")
            await self.writer.close()
        except BaseException:
            if self.writer is not None:
                await _discard(self.blobs, self.writer)
            raise
        return self.writer


@router.post("/files", response_model=p.FileObject, openapi_extra={"requestBody": FILE_UPLOAD_BODY})
async def create_file(
    request: Request, store: StoreDep, blobs: BlobsDep, settings: SettingsDep, project: ProjectDep
) -> p.FileObject:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > settings.max_file_bytes + MAX_FIELD_BYTES:
        raise too_large(settings.max_file_bytes)
    await check_quotas(store, settings, project, add_bytes=1)
    fid = file_id()
    key = f"files/{fid}"
    upload = _Upload(blobs, key, settings.max_file_bytes, settings.body_idle_timeout)
    writer = await upload.receive(request)
    fields, filename = upload.fields, upload.filename
    now = int(time.time())
    try:
        purpose = _check_purpose(fields)
        _check_filename(purpose, filename)
        expires_at = _expires_at(fields, purpose, now)
        await check_quotas(store, settings, project, add_bytes=max(1, writer.size))
        lines = upload.newlines + (1 if writer.size and upload.last_byte != b"\n" else 0)
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
            line_count=lines,
            est_tokens=writer.size // 4,
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
        stream_view(blobs, pieces),
        media_type="application/octet-stream",
        headers={
            "content-length": str(row["bytes"]),
            "content-disposition": f'attachment; filename="{_safe_name(row["filename"])}"',
        },
    )


async def stream_view(blobs: BlobStore, pieces: list[tuple[str, int]]) -> AsyncIterator[bytes]:
    """The bytes of a file: its own blob, or the result part blobs it is a view over."""
    for key, size in pieces:
        if size:
            async for data in blobs.stream(key):
                yield data


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)[:200] or "file"
