"""The validation job: lease a ``validating`` batch, check its file, plan its chunks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import orjson

from batchd.blobs import BlobStore
from batchd.config import Settings
from batchd.errors import BlobMissing
from batchd.ingest.parallel import validate_parallel
from batchd.ingest.validate import Plan, validate_file
from batchd.metrics import VALIDATED_BYTES, VALIDATED_LINES
from batchd.store import Store
from batchd.store.store import Row

log = logging.getLogger(__name__)


async def validate_next(store: Store, blobs: BlobStore, settings: Settings, owner: str) -> bool:
    """Validate one waiting batch, if any; True when one was taken."""
    ttl = settings.lease_seconds
    batch = await store.claim_validation(owner, time.time(), ttl)
    if batch is None:
        return False
    started = time.monotonic()
    renew = asyncio.create_task(_keep_job(store, batch["id"], owner, ttl))
    try:
        plan = await _validate(store, blobs, settings, batch)
    except BlobMissing:
        plan = Plan(
            errors=[
                {
                    "code": "input_file_missing",
                    "message": "The input file's bytes are gone.",
                    "param": "input_file_id",
                    "line": None,
                }
            ]
        )
    finally:
        renew.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renew
    checked = time.monotonic() - started
    now = int(time.time())
    if plan.errors:
        errors = orjson.dumps({"object": "list", "data": plan.errors}).decode()
        await store.fail_batch(batch["id"], owner, errors_json=errors, total=plan.total, now=now)
        outcome = "failed"
    else:
        chunk_rows = [{**c, "batch_id": batch["id"]} for c in plan.chunks]
        await store.start_batch(
            batch["id"],
            owner,
            model=plan.model,
            total=plan.total,
            chunk_rows=chunk_rows,
            expires_at=batch["expires_at"],
            now=now,
        )
        outcome = "in_progress"
    log.info(
        "validated batch: %s (%d lines, %d errors) in %.2fs (file checked in %.2fs)",
        outcome,
        plan.total,
        len(plan.errors),
        time.monotonic() - started,
        checked,
        extra={"batch_id": batch["id"], "action": "validate"},
    )
    return True


async def _validate(store: Store, blobs: BlobStore, settings: Settings, batch: Row) -> Plan:
    """In this process between awaits for a small file; in byte ranges on worker processes
    for a big one (the event loop only waits)."""
    key = await store.input_blob_key(batch["id"])
    size = await blobs.size(key)
    common = {
        "endpoint": batch["endpoint"],
        "chunk_lines": settings.chunk_lines,
        "max_lines": settings.max_lines_per_batch,
        "max_errors": settings.max_validation_errors,
        "max_line_bytes": settings.max_line_bytes,
        "id_bound": settings.validation_id_memory,
    }
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    plan = await _run_validation(blobs, key, size, settings, common)
    # Counted once per file (validation of a big file runs on other processes).
    VALIDATED_LINES.inc(min(plan.total, settings.max_lines_per_batch))
    VALIDATED_BYTES.inc(size)
    return plan


async def _run_validation(
    blobs: BlobStore, key: str, size: int, settings: Settings, common: dict[str, object]
) -> Plan:
    if size >= settings.parallel_validation_bytes and settings.validation_processes > 1:
        return await validate_parallel(
            blobs,
            key,
            size,
            storage_url=settings.storage_url,
            blob_dir=settings.blob_dir,
            processes=settings.validation_processes,
            work_dir=settings.data_dir,
            **common,  # type: ignore[arg-type]
        )
    return await validate_file(blobs, key, spill_dir=settings.data_dir, **common)  # type: ignore[arg-type]


async def _keep_job(store: Store, batch_id: str, owner: str, ttl: float) -> None:
    while True:
        await asyncio.sleep(ttl / 3)
        await store.renew_job(batch_id, owner, time.time(), ttl)
