"""Batch routes beyond OpenAI's API (documented as extensions in docs/api.md):

- ``GET /v1/batches/{id}/results``: the output (or error) lines checkpointed so far, also
  while the batch runs; once it has ended, exactly its output (or error) file.
- ``POST /v1/batches/{id}/pause`` and ``/resume``: workers stop leasing a paused batch's
  chunks and give back the ones they hold at their next checkpoint; the deadline keeps running.
- ``POST /v1/batches/{id}/rerun``: a new batch of the lines a finished batch did not complete.
"""

from __future__ import annotations

import time
from typing import Literal

import orjson
from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from batchd import protocol as p
from batchd.api.batches import _check_metadata, not_found
from batchd.api.deps import BlobsDep, ProjectDep, SettingsDep, StoreDep
from batchd.api.files import _discard, stream_view
from batchd.api.progress import present
from batchd.api.quotas import check_quotas
from batchd.blobs import BlobStore
from batchd.config import Settings
from batchd.errors import BlobMissing, InvalidRequest, NotFound
from batchd.ids import batch_id as new_batch_id
from batchd.ids import file_id
from batchd.ingest.rerun import copy_lines, error_custom_ids
from batchd.store import Store
from batchd.store.store import Row

router = APIRouter(tags=["batches (extensions)"])
ACTIVE = ("validating", "in_progress")


async def _batch(store: Store, project: str, bid: str) -> Row:
    row = await store.get_batch(bid, project)
    if row is None:
        raise not_found(bid)
    return row


# --------------------------------------------------------------------------------- results


async def _pieces(store: Store, row: Row, project: str, stream: str) -> list[tuple[str, int]]:
    """An ended batch: its result file (404 if deleted). A running one: the parts so far."""
    if row["status"] in p.TERMINAL_STATUSES:
        fid = row["output_file_id"] if stream == "output" else row["error_file_id"]
        if fid is None:
            return []
        if await store.get_file(project, fid) is None:
            raise NotFound(
                f"The {stream} file of batch {row['id']} ({fid}) was deleted.",
                param="stream",
                code="file_not_found",
            )
    return await store.view_parts(row["id"], stream)


@router.get(
    "/batches/{batch_id}/results",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/jsonl": {}}}},
)
async def batch_results(
    batch_id: str,
    store: StoreDep,
    blobs: BlobsDep,
    project: ProjectDep,
    stream: Literal["output", "errors"] = "output",
) -> StreamingResponse:
    row = await _batch(store, project, batch_id)
    pieces = await _pieces(store, row, project, "output" if stream == "output" else "error")
    return StreamingResponse(
        stream_view(blobs, pieces),
        media_type="application/jsonl",
        headers={"content-length": str(sum(n for _, n in pieces)), "x-batch-status": row["status"]},
    )


# ---------------------------------------------------------------------------- pause, resume


@router.post("/batches/{batch_id}/pause", response_model=p.Batch)
async def pause_batch(batch_id: str, store: StoreDep, project: ProjectDep) -> p.Batch:
    return await _set_paused(store, project, batch_id, int(time.time()), "pause", "batch_not_pausable")


@router.post("/batches/{batch_id}/resume", response_model=p.Batch)
async def resume_batch(batch_id: str, store: StoreDep, project: ProjectDep) -> p.Batch:
    return await _set_paused(store, project, batch_id, None, "resume", "batch_not_resumable")


async def _set_paused(
    store: Store, project: str, batch_id: str, paused_at: int | None, verb: str, code: str
) -> p.Batch:
    row = await store.set_paused(project, batch_id, paused_at)
    if row is None:
        raise not_found(batch_id)
    if row["status"] not in ACTIVE:
        raise InvalidRequest(
            f"Cannot {verb} a batch with status '{row['status']}'.", param="batch_id", code=code
        )
    return (await present(store, [row]))[0]


# ------------------------------------------------------------------------------------ rerun


def _rerun_params(row: Row, req: p.RerunRequest, settings: Settings) -> tuple[str, dict[str, str]]:
    window = req.completion_window or row["completion_window"]
    if window not in settings.window_seconds:
        raise InvalidRequest(
            f"Invalid completion_window '{window[:50]}'; this server allows: "
            f"{', '.join(settings.window_seconds)}.",
            param="completion_window",
            code="invalid_value",
        )
    if req.metadata is not None:
        metadata = dict(req.metadata)
    else:
        metadata = orjson.loads(row["metadata"]) if row["metadata"] else {}
    metadata["rerun_of"] = row["id"]
    _check_metadata(metadata)
    return window, metadata


async def _rerun_ids(store: Store, blobs: BlobStore, row: Row, project: str) -> set[str]:
    if row["status"] not in p.TERMINAL_STATUSES:
        raise InvalidRequest(
            f"Only a finished batch can be re-run; this one is '{row['status']}'.",
            param="batch_id",
            code="batch_not_rerunnable",
        )
    if row["error_file_id"] is None:
        raise InvalidRequest(
            "The batch has no failed, expired or cancelled lines.", param="batch_id", code="nothing_to_rerun"
        )
    if await store.get_file(project, row["error_file_id"]) is None:
        raise InvalidRequest(
            "The batch's error file was deleted: its lines can no longer be told apart.",
            param="batch_id",
            code="nothing_to_rerun",
        )
    return await error_custom_ids(blobs, await store.view_parts(row["id"], "error"))


async def _write_input(
    store: Store, blobs: BlobStore, row: Row, project: str, ids: set[str], now: int
) -> Row:
    """The new input file: the original lines of ``ids``, streamed into a new blob."""
    if await store.get_file(project, row["input_file_id"]) is None:
        raise InvalidRequest(
            "The batch's input file was deleted.", param="batch_id", code="input_file_missing"
        )
    fid = file_id()
    key = f"files/{fid}"
    writer = blobs.writer(key)
    try:
        lines = await copy_lines(blobs, await store.input_blob_key(row["id"]), ids, writer)
    except BaseException as exc:
        await _discard(blobs, writer)
        if isinstance(exc, BlobMissing):
            raise InvalidRequest(
                "The batch's input file is gone.", param="batch_id", code="input_file_missing"
            ) from exc
        raise
    await writer.close()
    if lines == 0:
        await blobs.delete(key)
        raise InvalidRequest(
            "None of the error file's custom_ids is in the input file.",
            param="batch_id",
            code="nothing_to_rerun",
        )
    return {
        "id": fid,
        "project": project,
        "filename": f"{row['id']}_rerun.jsonl",
        "purpose": "batch",
        "bytes": writer.size,
        "created_at": now,
        "expires_at": now + p.BATCH_INPUT_TTL,
        "blob_key": key,
        "sha256": writer.sha256,
        "batch_id": None,
        "stream": None,
        "line_count": lines,
        "est_tokens": writer.size // 4,
    }


@router.post("/batches/{batch_id}/rerun", response_model=p.Batch)
async def rerun_batch(
    batch_id: str,
    store: StoreDep,
    blobs: BlobsDep,
    settings: SettingsDep,
    project: ProjectDep,
    req: p.RerunRequest | None = None,
) -> p.Batch:
    row = await _batch(store, project, batch_id)
    window, metadata = _rerun_params(row, req or p.RerunRequest(), settings)
    ids = await _rerun_ids(store, blobs, row, project)
    await check_quotas(store, settings, project, add_batches=1, add_lines=len(ids))
    now = int(time.time())
    file_row = await _write_input(store, blobs, row, project, ids, now)
    try:
        await check_quotas(
            store, settings, project, add_bytes=file_row["bytes"], add_tokens=file_row["est_tokens"]
        )
        await store.insert_file(**file_row)
    except BaseException:
        await blobs.delete(file_row["blob_key"])
        raise
    new = await store.insert_batch(
        id=new_batch_id(),
        project=project,
        endpoint=row["endpoint"],
        input_file_id=file_row["id"],
        completion_window=window,
        status="validating",
        metadata=orjson.dumps(metadata).decode(),
        output_expires_seconds=row["output_expires_seconds"],
        created_at=now,
        expires_at=now + settings.window_seconds[window],
        webhook_url=row.get("webhook_url"),  # checked when the original was created
    )
    return (await present(store, [new]))[0]
