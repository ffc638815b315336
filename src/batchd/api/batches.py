"""``/v1/batches``: create, retrieve, list, cancel. Execution happens in the worker."""

from __future__ import annotations

import time
from typing import Annotated

import orjson
from fastapi import APIRouter, Query

from batchd import protocol as p
from batchd.api.deps import ProjectDep, SettingsDep, StoreDep, WakeWorkerDep
from batchd.api.presenters import batch_object
from batchd.api.progress import present
from batchd.api.quotas import check_quotas
from batchd.api.webhooks import check_webhook_url, prepare_project
from batchd.errors import InvalidRequest, NotFound
from batchd.ids import batch_id

router = APIRouter(tags=["batches"])

MAX_METADATA_PAIRS, MAX_KEY, MAX_VALUE = 16, 64, 512


def not_found(bid: str) -> NotFound:
    return NotFound(f"No such Batch object: {bid}", param="batch_id", code="batch_not_found")


def _check_metadata(metadata: dict[str, str] | None) -> None:
    if metadata is None:
        return
    if len(metadata) > MAX_METADATA_PAIRS:
        raise InvalidRequest(
            f"metadata may hold at most {MAX_METADATA_PAIRS} pairs.", param="metadata", code="invalid_value"
        )
    for key, value in metadata.items():
        if len(key) > MAX_KEY:
            raise InvalidRequest(
                f"metadata keys may be at most {MAX_KEY} characters.", param="metadata", code="invalid_value"
            )
        if len(value) > MAX_VALUE:
            raise InvalidRequest(
                f"metadata values may be at most {MAX_VALUE} characters.",
                param="metadata",
                code="invalid_value",
            )


@router.post("/batches", response_model=p.Batch)
async def create_batch(
    req: p.CreateBatchRequest,
    store: StoreDep,
    settings: SettingsDep,
    project: ProjectDep,
    wake_worker: WakeWorkerDep,
) -> p.Batch:
    if req.endpoint not in p.BATCH_ENDPOINTS:
        raise InvalidRequest(
            f"Unsupported endpoint '{req.endpoint[:100]}'; supported: {', '.join(p.BATCH_ENDPOINTS)}.",
            param="endpoint",
            code="invalid_value",
        )
    windows = settings.window_seconds
    if req.completion_window not in windows:
        raise InvalidRequest(
            f"Invalid completion_window '{req.completion_window[:50]}'; this server allows: "
            f"{', '.join(windows)}.",
            param="completion_window",
            code="invalid_value",
        )
    _check_metadata(req.metadata)
    if req.webhook_url is not None:
        check_webhook_url(settings, req.webhook_url)
    source = await store.get_file(project, req.input_file_id)
    if source is None:
        raise NotFound(f"No such File object: {req.input_file_id}", param="input_file_id")
    if source["purpose"] != "batch":
        raise InvalidRequest(
            f"The input file must have purpose 'batch', not '{source['purpose']}'.",
            param="input_file_id",
            code="invalid_value",
        )
    await check_quotas(
        store,
        settings,
        project,
        add_batches=1,
        add_lines=source.get("line_count") or 0,
        add_tokens=source.get("est_tokens") or 0,
    )
    if req.webhook_url is not None:
        await prepare_project(store, project)
    now = int(time.time())
    row = await store.insert_batch(
        id=batch_id(),
        project=project,
        endpoint=req.endpoint,
        input_file_id=req.input_file_id,
        completion_window=req.completion_window,
        status="validating",
        metadata=orjson.dumps(req.metadata).decode() if req.metadata is not None else None,
        output_expires_seconds=req.output_expires_after.seconds if req.output_expires_after else None,
        created_at=now,
        expires_at=now + windows[req.completion_window],
        webhook_url=req.webhook_url,
    )
    wake_worker()
    return batch_object(row)


@router.get("/batches/{batch_id}", response_model=p.Batch)
async def retrieve_batch(batch_id: str, store: StoreDep, project: ProjectDep) -> p.Batch:
    row = await store.get_batch(batch_id, project)
    if row is None:
        raise not_found(batch_id)
    return (await present(store, [row]))[0]


@router.get("/batches", response_model=p.BatchList)
async def list_batches(
    store: StoreDep,
    project: ProjectDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: str | None = None,
) -> p.BatchList:
    page = await store.list_batches(project, limit=limit, after=after)
    if page is None:
        raise InvalidRequest(
            f"No such Batch object for 'after': {after}", param="after", code="invalid_value"
        )
    rows, has_more = page
    data = await present(store, rows)
    return p.BatchList(
        data=data,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        has_more=has_more,
    )


@router.post("/batches/{batch_id}/cancel", response_model=p.Batch)
async def cancel_batch(batch_id: str, store: StoreDep, project: ProjectDep) -> p.Batch:
    row = await store.request_cancel(project, batch_id, int(time.time()))
    if row is None:
        raise not_found(batch_id)
    if row["status"] not in ("cancelling", "cancelled"):
        # Final: a 400, never a 409 (the SDK retries 409 twice).
        raise InvalidRequest(
            f"Cannot cancel a batch with status '{row['status']}'.",
            param="batch_id",
            code="batch_not_cancellable",
        )
    return batch_object(row)
