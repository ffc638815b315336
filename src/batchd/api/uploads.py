"""``/v1/uploads``: a file in parts. Each part is streamed into its own blob; completion
streams the parts in order into one file blob (bounded memory) and inserts the file row."""

from __future__ import annotations

import contextlib
import hashlib
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from batchd import protocol as p
from batchd.api.deps import BlobsDep, ProjectDep, SettingsDep, StoreDep
from batchd.api.files import _check_filename, too_large
from batchd.api.openapi import PART_UPLOAD_BODY
from batchd.api.presenters import file_object
from batchd.api.quotas import check_quotas
from batchd.blobs import BlobStore, BlobWriter
from batchd.errors import BatchdError, InvalidRequest, MissingParameter, NotFound, PayloadTooLarge
from batchd.ids import file_id, part_id, upload_id
from batchd.ingest.multipart import MAX_FIELD_BYTES, iter_multipart
from batchd.store import Store

router = APIRouter(tags=["uploads"])


def not_found(uid: str) -> NotFound:
    return NotFound(f"No such Upload object: {uid}", param="upload_id")


def part_too_large() -> PayloadTooLarge:
    return PayloadTooLarge(
        f"A part may hold at most {p.MAX_PART_BYTES} bytes.", param="data", code="part_too_large"
    )


async def _upload_object(store: Store, project: str, row: dict[str, Any]) -> JSONResponse:
    file = None
    if row["file_id"]:
        f = await store.get_file(project, row["file_id"])
        file = file_object(f) if f else None
    status = row["status"]
    if status == "pending" and row["expires_at"] <= time.time():
        status = "expired"
    obj = p.Upload(
        id=row["id"],
        bytes=row["bytes"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        filename=row["filename"],
        purpose=row["purpose"],
        status=status,
        file=file,
    )
    # OpenAI's schema types ``file`` as an object: leave the key out while there is none.
    return JSONResponse(obj.model_dump(mode="json", exclude={"file"} if file is None else None))


async def _pending(store: Store, project: str, uid: str, action: str) -> dict[str, Any]:
    row = await store.get_upload(project, uid)
    if row is None:
        raise not_found(uid)
    status = row["status"]
    if status == "pending" and row["expires_at"] <= time.time():
        status = "expired"
    if status != "pending":
        raise InvalidRequest(
            f"Cannot {action} upload {uid}: its status is {status}.", param="upload_id", code="invalid_state"
        )
    return row


@router.post("/uploads", response_model=p.Upload)
async def create_upload(
    body: p.CreateUploadRequest, store: StoreDep, settings: SettingsDep, project: ProjectDep
) -> JSONResponse:
    if body.purpose not in p.UPLOAD_PURPOSES:
        raise InvalidRequest(
            f"Invalid purpose '{body.purpose[:100]}'; expected one of {', '.join(p.UPLOAD_PURPOSES)}.",
            param="purpose",
            code="invalid_value",
        )
    _check_filename(body.purpose, body.filename)
    if body.bytes > settings.max_file_bytes:
        err = too_large(settings.max_file_bytes)
        err.param = "bytes"
        raise err
    # The declared size must fit the project's byte quota now; each part is checked again as
    # it is stored (parts count as stored bytes until the upload ends).
    await check_quotas(store, settings, project, add_bytes=max(1, body.bytes))
    now = int(time.time())
    row = await store.insert_upload(
        id=upload_id(),
        project=project,
        filename=body.filename,
        purpose=body.purpose,
        bytes=body.bytes,
        mime_type=body.mime_type,
        file_expires_seconds=body.expires_after.seconds if body.expires_after else None,
        status="pending",
        created_at=now,
        expires_at=now + p.UPLOAD_TTL,
    )
    return await _upload_object(store, project, row)


async def _discard(blobs: BlobStore, writer: BlobWriter) -> None:
    with contextlib.suppress(BatchdError, OSError):
        await writer.close()
    with contextlib.suppress(BatchdError, OSError):
        await blobs.delete(writer.key)


@router.post(
    "/uploads/{upload_id}/parts", response_model=p.UploadPart, openapi_extra={"requestBody": PART_UPLOAD_BODY}
)
async def add_part(  # noqa: C901 - one streaming loop with its checks
    upload_id: str,
    request: Request,
    store: StoreDep,
    blobs: BlobsDep,
    settings: SettingsDep,
    project: ProjectDep,
) -> p.UploadPart:
    await _pending(store, project, upload_id, "add a part to")
    await check_quotas(store, settings, project, add_bytes=1)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > p.MAX_PART_BYTES + MAX_FIELD_BYTES:
        raise part_too_large()
    pid = part_id()
    key = f"uploads/{upload_id}/{pid}"
    writer: BlobWriter | None = None
    in_data = False
    try:
        async for kind, payload in iter_multipart(request, settings.body_idle_timeout):
            if kind == "start":
                in_data = payload.name == "data"
                if in_data:
                    if writer is not None:
                        raise InvalidRequest("Send exactly one 'data' part.", param="data")
                    writer = blobs.writer(key)
            elif kind == "data" and in_data and writer is not None:
                await writer.write(payload)
                if writer.size > p.MAX_PART_BYTES:
                    raise part_too_large()
            elif kind == "end":
                in_data = False
        if writer is None:
            raise MissingParameter("data")
        await writer.close()
        await check_quotas(store, settings, project, add_bytes=max(1, writer.size))
        now = int(time.time())
        if not await store.add_upload_part(
            id=pid, upload_id=upload_id, bytes=writer.size, blob_key=key, created_at=now
        ):
            raise InvalidRequest(f"Upload {upload_id} is no longer pending.", param="upload_id")
    except BaseException:
        if writer is not None:
            await _discard(blobs, writer)
        raise
    return p.UploadPart(id=pid, created_at=now, upload_id=upload_id)


@router.post("/uploads/{upload_id}/complete", response_model=p.Upload)
async def complete_upload(  # noqa: C901 - checks, then one streaming pass
    upload_id: str,
    body: p.CompleteUploadRequest,
    store: StoreDep,
    blobs: BlobsDep,
    project: ProjectDep,
) -> JSONResponse:
    row = await _pending(store, project, upload_id, "complete")
    parts = {r["id"]: r for r in await store.upload_parts_of(upload_id)}
    if not body.part_ids:
        raise InvalidRequest("part_ids must name at least one part.", param="part_ids", code="invalid_value")
    if len(set(body.part_ids)) != len(body.part_ids):
        raise InvalidRequest("part_ids names a part twice.", param="part_ids", code="invalid_value")
    unknown = [pid for pid in body.part_ids if pid not in parts]
    if unknown:
        raise InvalidRequest(
            f"Part {unknown[0][:100]} does not belong to upload {upload_id}.",
            param="part_ids",
            code="invalid_value",
        )
    total = sum(parts[pid]["bytes"] for pid in body.part_ids)
    if total != row["bytes"]:
        raise InvalidRequest(
            f"The parts hold {total} bytes, but the upload was created with bytes={row['bytes']}.",
            param="part_ids",
            code="invalid_value",
        )
    fid = file_id()
    key = f"files/{fid}"
    md5 = hashlib.md5(usedforsecurity=False)
    writer = blobs.writer(key)
    try:
        for pid in body.part_ids:
            async for data in blobs.stream(parts[pid]["blob_key"]):
                md5.update(data)
                await writer.write(data)
        await writer.close()
    except BaseException:
        await _discard(blobs, writer)
        raise
    try:
        if body.md5 is not None and body.md5.lower() != md5.hexdigest():
            raise InvalidRequest(
                f"The md5 of the parts is {md5.hexdigest()}, not {body.md5[:64]}.",
                param="md5",
                code="invalid_value",
            )
        now = int(time.time())
        seconds = row["file_expires_seconds"]
        if seconds:
            expires_at: int | None = now + seconds
        else:
            expires_at = now + p.BATCH_INPUT_TTL if row["purpose"] == "batch" else None
        file_row = {
            "id": fid,
            "project": project,
            "filename": row["filename"],
            "purpose": row["purpose"],
            "bytes": writer.size,
            "created_at": now,
            "expires_at": expires_at,
            "blob_key": key,
            "sha256": writer.sha256,
            "batch_id": None,
            "stream": None,
        }
        if not await store.end_upload(upload_id, "completed", file_row):
            raise InvalidRequest(f"Upload {upload_id} is no longer pending.", param="upload_id")
    except BaseException:
        with contextlib.suppress(BatchdError, OSError):
            await blobs.delete(key)
        raise
    for part_key in await store.drop_upload_parts(upload_id, expire=False):
        with contextlib.suppress(BatchdError, OSError):
            await blobs.delete(part_key)
    done = await store.get_upload(project, upload_id)
    assert done is not None
    return await _upload_object(store, project, done)


@router.post("/uploads/{upload_id}/cancel", response_model=p.Upload)
async def cancel_upload(
    upload_id: str, store: StoreDep, blobs: BlobsDep, project: ProjectDep
) -> JSONResponse:
    await _pending(store, project, upload_id, "cancel")
    if not await store.end_upload(upload_id, "cancelled"):
        raise InvalidRequest(f"Upload {upload_id} is no longer pending.", param="upload_id")
    for key in await store.drop_upload_parts(upload_id, expire=False):
        with contextlib.suppress(BatchdError, OSError):
            await blobs.delete(key)
    row = await store.get_upload(project, upload_id)
    assert row is not None
    return await _upload_object(store, project, row)
