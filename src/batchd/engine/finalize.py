"""Ending a batch: report unfinished lines, publish result files as views, set the status.

Idempotent: the tail part (``batch_expired``/``batch_cancelled`` lines) goes to a fixed key
and is recorded in the same transaction as the terminal status, so a crash anywhere before
that commit simply runs finalization again.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from batchd.blobs import BlobStore
from batchd.engine.chunk_run import bitmap_to_int
from batchd.engine.janitor import sweep_batch_parts
from batchd.engine.results import error_result
from batchd.ids import file_id
from batchd.ingest.lines import clean, split_block
from batchd.ingest.lineshape import custom_id_of
from batchd.metrics import BATCHES_FINISHED, LINES_ENDED
from batchd.protocol import OUTPUT_TTL
from batchd.store import Store
from batchd.store.store import PartCommit, Row

log = logging.getLogger(__name__)


def _terminal(batch: Row, open_chunks: int, now: float) -> tuple[str, str | None]:
    """(status, line error code for unfinished lines)."""
    if batch["status"] == "cancelling":
        return "cancelled", "batch_cancelled"
    if open_chunks == 0 and batch["status"] != "validating":
        return "completed", None
    return "expired", "batch_expired"


async def finalize_batch(store: Store, blobs: BlobStore, batch_id: str, owner: str, ttl: float) -> bool:
    now = time.time()
    batch = await store.claim_finalization(batch_id, owner, now, ttl)
    if batch is None:
        return False
    plan = await store.chunk_plan(batch_id)
    open_chunks = [c for c in plan if c["state"] != "done"]
    status, code = _terminal(batch, len(open_chunks), now)
    stamps: dict[str, Any] = {}
    if status == "completed" and batch["status"] == "in_progress":
        stamps["finalizing_at"] = int(now)
        await store.set_status(batch_id, owner, "finalizing", stamps)
    tail = None
    if code and open_chunks:
        tail = await _write_tail(store, blobs, batch, open_chunks, code)
    parts = await store.parts(batch_id)
    out_bytes = sum(p["out_bytes"] for p in parts)
    err_bytes = sum(p["err_bytes"] for p in parts) + (tail.err_bytes if tail else 0)
    end = int(time.time())
    stamps[f"{status}_at"] = end
    output_file = _result_file(batch, "output", out_bytes, end) if out_bytes else None
    error_file = _result_file(batch, "error", err_bytes, end) if err_bytes else None
    done = await store.finish_batch(
        batch_id,
        owner,
        status=status,
        stamps=stamps,
        tail=tail,
        output_file=output_file,
        error_file=error_file,
    )
    if done:
        BATCHES_FINISHED.labels(status).inc()
        if tail is not None and code is not None:
            LINES_ENDED[code].inc(tail.err_lines)
        await sweep_batch_parts(store, blobs, batch_id)
        log.info(
            "batch %s",
            status,
            extra={"batch_id": batch_id, "action": "finalize", "elapsed": end - batch["created_at"]},
        )
    return done


def _result_file(batch: Row, stream: str, size: int, now: int) -> Row:
    ttl = batch["output_expires_seconds"] or OUTPUT_TTL
    return {
        "id": file_id(),
        "project": batch["project"],
        "filename": f"{batch['id']}_{stream}.jsonl",
        "purpose": "batch_output",
        "bytes": size,
        "created_at": now,
        "expires_at": now + ttl,
        "blob_key": None,
        "sha256": None,
        "batch_id": batch["id"],
        "stream": stream,
    }


async def _write_tail(
    store: Store, blobs: BlobStore, batch: Row, open_chunks: list[Row], code: str
) -> PartCommit | None:
    """One error line for every line that never got a result, read back from the input."""
    input_key = await store.input_blob_key(batch["id"])
    key = f"batches/{batch['id']}/tail.err.jsonl"
    writer = blobs.writer(key)
    lines = 0
    for chunk in open_chunks:
        done = 0
        for bitmap in await store.done_bitmaps(batch["id"], chunk["idx"]):
            done |= bitmap_to_int(bitmap)
        block = await blobs.get_range(input_key, chunk["byte_start"], chunk["byte_end"])
        idx = 0
        for start, _end, raw in split_block(block, chunk["byte_start"]):
            text = clean(raw, start == 0)
            if text is None:
                continue
            if not (done >> idx) & 1:
                custom_id = custom_id_of(text)
                await writer.write(error_result(custom_id, code).line)
                lines += 1
            idx += 1
    await writer.close()
    if not lines:
        await blobs.delete(key)
        return None
    return PartCommit(
        batch_id=batch["id"],
        chunk_idx=batch["chunk_count"],
        generation=0,
        out_key=None,
        out_bytes=0,
        out_lines=0,
        err_key=key,
        err_bytes=writer.size,
        err_lines=lines,
        done_bitmap=b"",
        completed=0,
        failed=0,
        usage=(0, 0, 0, 0, 0),
        chunk_done=False,
    )

