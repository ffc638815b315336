"""The janitor expires abandoned uploads and deletes their part blobs."""

from __future__ import annotations

import asyncio
from pathlib import Path

from batchd.blobs import BlobStore
from batchd.engine.janitor import purge_uploads, sweep_orphans
from batchd.store import Store
from batchd.store.migrate import upgrade


def test_expired_pending_uploads_lose_their_parts(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite3'}"
    upgrade(url)

    async def run() -> None:
        store, blobs = Store.open(url), BlobStore.local(tmp_path / "blobs")
        try:
            for uid, expires_at in (("upload_old", 100), ("upload_new", 2_000_000_000)):
                await store.insert_upload(
                    id=uid,
                    project="p",
                    filename="x.jsonl",
                    purpose="batch",
                    bytes=2,
                    mime_type="t",
                    status="pending",
                    created_at=0,
                    expires_at=expires_at,
                )
                await blobs.put(f"uploads/{uid}/part_1", b"ab")
                assert await store.add_upload_part(
                    id=f"{uid}_part", upload_id=uid, bytes=2, blob_key=f"uploads/{uid}/part_1", created_at=0
                )
            assert await purge_uploads(store, blobs) == 1
            old, new = await store.get_upload("p", "upload_old"), await store.get_upload("p", "upload_new")
            assert old is not None and old["status"] == "expired"
            assert new is not None and new["status"] == "pending"
            assert not (tmp_path / "blobs/uploads/upload_old/part_1").exists()
            assert (tmp_path / "blobs/uploads/upload_new/part_1").exists()
            assert await store.upload_parts_of("upload_old") == []
            assert await purge_uploads(store, blobs) == 0
            # A part blob whose row never got written is an orphan; a recorded one is not.
            await blobs.put("uploads/upload_new/part_orphan", b"x")
            assert await sweep_orphans(store, blobs, grace=-1) == 1
            assert (tmp_path / "blobs/uploads/upload_new/part_1").exists()
        finally:
            await store.close()

    asyncio.run(run())
