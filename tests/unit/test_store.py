"""The store on a real SQLite file: migrations, leases, fencing, finalization candidates."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from batchd.store import Store
from batchd.store.migrate import upgrade
from batchd.store.store import PartCommit
from batchd.store.tables import metadata


def test_migrations_match_the_tables(db_url: str) -> None:
    url = db_url
    upgrade(url)
    upgrade(url)  # idempotent

    async def diff() -> list[Any]:
        store = Store.open(url)
        try:
            async with store.engine.connect() as conn:
                return await conn.run_sync(
                    lambda c: compare_metadata(MigrationContext.configure(c), metadata)
                )
        finally:
            await store.close()

    assert asyncio.run(diff()) == []


async def _seed(store: Store, chunks: int = 2, expires_at: int = 2_000_000_000) -> None:
    await store.insert_file(
        id="file-1",
        project="p",
        filename="f.jsonl",
        purpose="batch",
        bytes=1,
        created_at=1,
        expires_at=None,
        blob_key="files/file-1",
        sha256=None,
        batch_id=None,
        stream=None,
    )
    await store.insert_batch(
        id="batch_1",
        project="p",
        endpoint="/v1/chat/completions",
        model=None,
        input_file_id="file-1",
        completion_window="24h",
        status="validating",
        metadata=None,
        output_expires_seconds=None,
        created_at=1,
        expires_at=expires_at,
    )
    job = await store.claim_validation("v", 100.0, 30)
    assert job is not None and job["id"] == "batch_1"
    assert await store.claim_validation("other", 100.0, 30) is None  # leased
    rows = [
        {
            "batch_id": "batch_1",
            "idx": i,
            "first_line": 1 + 4 * i,
            "line_count": 4,
            "byte_start": 0,
            "byte_end": 1,
        }
        for i in range(chunks)
    ]
    assert await store.start_batch(
        "batch_1", "v", model="m", total=4 * chunks, chunk_rows=rows, expires_at=expires_at, now=2
    )


def _part(gen: int, idx: int = 0, bits: int = 0b0011, done: bool = False) -> PartCommit:
    return PartCommit(
        batch_id="batch_1",
        chunk_idx=idx,
        generation=gen,
        out_key="k",
        out_bytes=10,
        out_lines=2,
        err_key=None,
        err_bytes=0,
        err_lines=0,
        done_bitmap=bits.to_bytes(1, "little"),
        completed=2,
        failed=0,
        usage=(1, 0, 2, 0, 3),
        chunk_done=done,
    )


def test_lease_fencing_and_takeover(db_url: str) -> None:
    url = db_url
    upgrade(url)

    async def run() -> None:
        store = Store.open(url)
        try:
            await _seed(store)
            a = await store.lease_chunks("A", now=100.0, ttl=10, n=1)
            assert [(c["idx"], c["generation"]) for c in a] == [(0, 1)]
            assert await store.commit_part("A", _part(1), 101.0, 10)
            # A stops heartbeating; after its lease runs out B takes chunk 0 over.
            b = await store.lease_chunks("B", now=200.0, ttl=10, n=5)
            assert sorted((c["idx"], c["generation"]) for c in b) == [(0, 2), (1, 1)]
            assert await store.heartbeat("A", [("batch_1", 0, 1)], 201.0, 10) == {("batch_1", 0)}
            assert not await store.commit_part("A", _part(1, bits=0b1100), 201.0, 10)  # fenced
            assert [bytes(x) for x in await store.done_bitmaps("batch_1", 0)] == [b"\x03"]
            assert await store.commit_part("B", _part(2, bits=0b1100, done=True), 202.0, 10)
            batch = await store.get_batch("batch_1")
            assert batch is not None and batch["completed"] == 4 and batch["total_tokens"] == 6
            assert await store.finalize_candidates(203.0) == []  # chunk 1 still open and leased
            await store.release_chunk("B", "batch_1", 1, 1)
            assert await store.commit_part("B", _part(1, idx=1, done=True), 204.0, 10) is False
            again = await store.lease_chunks("B", now=205.0, ttl=10, n=5)
            assert [(c["idx"], c["generation"]) for c in again] == [(1, 2)]
            assert await store.commit_part("B", _part(2, idx=1, bits=0b1111, done=True), 206.0, 10)
            assert [c["id"] for c in await store.finalize_candidates(207.0)] == ["batch_1"]
        finally:
            await store.close()

    asyncio.run(run())


def test_cancelled_batch_is_not_leased_and_expired_chunks_stop(db_url: str) -> None:
    url = db_url
    upgrade(url)

    async def run() -> None:
        store = Store.open(url)
        try:
            await _seed(store, expires_at=500)
            assert len(await store.lease_chunks("A", now=600.0, ttl=10, n=5)) == 0  # past deadline
            assert [c["id"] for c in await store.finalize_candidates(600.0)] == ["batch_1"]
            row = await store.request_cancel("p", "batch_1", 3)
            assert row is not None and row["status"] == "cancelling"
            assert await store.request_cancel("other-project", "batch_1", 3) is None
            assert await store.lease_chunks("A", now=100.0, ttl=10, n=5) == []
        finally:
            await store.close()

    asyncio.run(run())


def test_compacting_part_replaces_its_generations_parts_without_counting_twice(db_url: str) -> None:
    """The durable window's last commit: one part replaces the small ones of the same lease in
    the transaction that marks the chunk done; counts and done lines are not added again, and
    parts of another generation (or not named) stay."""
    upgrade(db_url)

    async def run() -> None:
        store = Store.open(db_url)
        try:
            await _seed(store, chunks=1)
            await store.lease_chunks("A", now=100.0, ttl=10, n=1)
            assert await store.commit_part("A", replace(_part(1, bits=0b0001), out_key="a1"), 101.0, 10)
            await store.lease_chunks("B", now=200.0, ttl=10, n=1)  # A's lease ran out: generation 2
            assert await store.commit_part("B", replace(_part(2, bits=0b0010), out_key="b1"), 201.0, 10)
            assert await store.commit_part("B", replace(_part(2, bits=0b0100), out_key="b2"), 202.0, 10)
            assert await store.commit_part("B", replace(_part(2, bits=0b1000), out_key="b3"), 203.0, 10)
            merged = replace(
                _part(2, bits=0b1110, done=True), out_key="b-all", out_lines=3, replaces=("b1", "b2")
            )
            assert not await store.commit_part("A", replace(merged, generation=1), 204.0, 10)  # fenced
            assert await store.commit_part("B", merged, 204.0, 10)
            keys = [k for k, _ in await store.view_parts("batch_1", "output")]
            assert sorted(keys) == ["a1", "b-all", "b3"]
            batch = await store.get_batch("batch_1")
            assert batch is not None and batch["completed"] == 8  # four parts of 2, none twice
            chunk = await store.get_chunk("batch_1", 0)
            assert chunk is not None and chunk["state"] == "done" and chunk["done_lines"] == 8
        finally:
            await store.close()

    asyncio.run(run())
