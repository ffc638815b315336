"""Cleaning up: deleted and expired files, and bytes that a crash left without an owner.

A crash can leave three kinds of orphan: a local store's half-written staging file (killed
mid-upload), an uploaded blob whose file row was never inserted (killed between the two), and a
result part blob whose checkpoint never committed. None is ever read; all are deleted once they
are older than ``orphan_grace`` (so nothing still being written is touched).
"""

from __future__ import annotations

import logging
import time

from batchd.blobs import BlobStore
from batchd.store import Store

log = logging.getLogger(__name__)


async def purge_files(store: Store, blobs: BlobStore) -> int:
    """Remove files that were deleted or have expired and that no active batch reads."""
    purged = 0
    for f in await store.files_to_purge(int(time.time())):
        for key in await store.purge_file(f["id"]):
            await blobs.delete(key)
        purged += 1
    return purged


async def sweep_orphans(store: Store, blobs: BlobStore, grace: float) -> int:
    cutoff = time.time() - grace
    removed = blobs.sweep_staging(cutoff)
    batch: list[str] = []
    async for key, modified in blobs.list_keys("files/"):
        if modified < cutoff:
            batch.append(key)
        if len(batch) >= 500:
            removed += await _drop_unknown_uploads(store, blobs, batch)
            batch = []
    removed += await _drop_unknown_uploads(store, blobs, batch)
    removed += await _drop_unknown_parts(store, blobs, cutoff)
    if removed:
        log.info("removed %d orphaned blobs", removed, extra={"action": "janitor"})
    return removed


async def _drop_unknown_uploads(store: Store, blobs: BlobStore, keys: list[str]) -> int:
    if not keys:
        return 0
    known = await store.known_blob_keys(keys)
    unknown = [k for k in keys if k not in known]
    for key in unknown:
        await blobs.delete(key)
    return len(unknown)


async def sweep_batch_parts(store: Store, blobs: BlobStore, batch_id: str) -> int:
    """After a batch ends, delete part blobs that no committed part references."""
    referenced = await store.part_keys(batch_id)
    removed = 0
    async for key, _ in blobs.list_keys(f"batches/{batch_id}/"):
        if key not in referenced:
            await blobs.delete(key)
            removed += 1
    return removed


async def purge_uploads(store: Store, blobs: BlobStore) -> int:
    """Expire pending uploads past their hour and delete the parts of ended uploads."""
    cleaned = 0
    for u in await store.uploads_to_clean(int(time.time())):
        for key in await store.drop_upload_parts(u["id"], expire=u["status"] == "pending"):
            await blobs.delete(key)
        cleaned += 1
    return cleaned


async def _drop_unknown_parts(store: Store, blobs: BlobStore, cutoff: float) -> int:
    """Upload part blobs whose row was never inserted (killed between the two)."""
    old = [key async for key, modified in blobs.list_keys("uploads/") if modified < cutoff]
    removed = 0
    for i in range(0, len(old), 500):
        keys = old[i : i + 500]
        known = await store.known_part_keys(keys)
        for key in keys:
            if key not in known:
                await blobs.delete(key)
                removed += 1
    return removed
