"""The fair lease order on a real store (SQLite file and PostgreSQL): round-robin across
projects, earliest deadline first within a project, and the per-batch cap."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from batchd.store import Store
from batchd.store.migrate import upgrade


async def seed_batch(store: Store, batch_id: str, project: str, chunks: int, expires_at: int) -> None:
    """A batch that passed validation with ``chunks`` chunks of one line each."""
    await new_batch(store, batch_id, project, expires_at)
    job = await store.claim_validation("v", 100.0, 30)
    assert job is not None and job["id"] == batch_id
    await start(store, batch_id, chunks, expires_at)


async def new_batch(store: Store, batch_id: str, project: str, expires_at: int) -> None:
    """A batch just created: ``validating``, its file waiting to be checked."""
    await store.insert_file(
        id=f"file-{batch_id}",
        project=project,
        filename="f.jsonl",
        purpose="batch",
        bytes=1,
        created_at=1,
        expires_at=None,
        blob_key=f"files/{batch_id}",
        sha256=None,
        batch_id=None,
        stream=None,
    )
    await store.insert_batch(
        id=batch_id,
        project=project,
        endpoint="/v1/chat/completions",
        model=None,
        input_file_id=f"file-{batch_id}",
        completion_window="24h",
        status="validating",
        metadata=None,
        output_expires_seconds=None,
        created_at=1,
        expires_at=expires_at,
    )


async def start(store: Store, batch_id: str, chunks: int, expires_at: int) -> None:
    rows = [
        {
            "batch_id": batch_id,
            "idx": i,
            "first_line": i + 1,
            "line_count": 1,
            "byte_start": i,
            "byte_end": i + 1,
        }
        for i in range(chunks)
    ]
    assert await store.start_batch(
        batch_id, "v", model="m", total=chunks, chunk_rows=rows, expires_at=expires_at, now=2
    )


def on_store(db_url: str, run: Callable[[Store], Awaitable[None]]) -> None:
    """``run`` on a migrated store, closed afterwards."""
    upgrade(db_url)

    async def go() -> None:
        store = Store.open(db_url)
        try:
            await run(store)
        finally:
            await store.close()

    asyncio.run(go())


def keys(rows: list[dict[str, object]]) -> list[str]:
    return sorted(f"{r['batch_id']}#{r['idx']}" for r in rows)


def test_round_robin_across_projects_edf_within_and_per_batch_cap(db_url: str) -> None:
    async def run(store: Store) -> None:
        await seed_batch(store, "big", "p-big", chunks=10, expires_at=3000)
        await seed_batch(store, "late", "p2", chunks=1, expires_at=2500)
        await seed_batch(store, "soon", "p2", chunks=2, expires_at=2000)  # created later, due first
        await seed_batch(store, "mid", "p3", chunks=3, expires_at=2200)
        order = []
        for _ in range(8):
            got = await store.lease_chunks("A", now=100.0, ttl=60, n=1, per_batch=2)
            order.extend(keys(got))
        # Each round serves the project holding the fewest live chunks; ties go to the
        # earlier deadline. "big" and "mid" stop at two chunks each (A's per-batch cap).
        assert order == ["soon#0", "mid#0", "big#0", "soon#1", "mid#1", "big#1", "late#0"]
        # The cap is per owner: another worker may take two more of each capped batch.
        assert keys(await store.lease_chunks("B", now=100.0, ttl=60, n=10, per_batch=2)) == [
            "big#2",
            "big#3",
            "mid#2",
        ]
        # Only the huge batch has chunks left; a third worker gets its cap of them.
        assert keys(await store.lease_chunks("C", now=100.0, ttl=60, n=5, per_batch=2)) == [
            "big#4",
            "big#5",
        ]

    on_store(db_url, run)


def test_small_batch_behind_a_huge_one_is_leased_next(db_url: str) -> None:
    async def run(store: Store) -> None:
        await seed_batch(store, "huge", "p1", chunks=2000, expires_at=3000)
        first = await store.lease_chunks("A", now=100.0, ttl=60, n=16, per_batch=4)
        assert keys(first) == [f"huge#{i}" for i in range(4)]  # the cap leaves room
        # A small batch of the same project, due later, arrives behind 1,996 waiting chunks.
        await seed_batch(store, "small", "p1", chunks=1, expires_at=4000)
        await seed_batch(store, "other", "p2", chunks=2, expires_at=5000)
        nxt = await store.lease_chunks("A", now=100.0, ttl=60, n=16, per_batch=4)
        assert keys(nxt) == ["other#0", "other#1", "small#0"]
        # Without a cap a lease round takes chunks of the huge batch, fewest-held project first.
        assert len(await store.lease_chunks("B", now=100.0, ttl=60, n=5)) == 5

    on_store(db_url, run)


def test_validation_alternates_projects_edf_within(db_url: str) -> None:
    """Project a created four batches before b and c created theirs: validation still serves
    the project with the fewest batches in progress or validating first, so none of them
    waits for all of another's files; within a project the earlier deadline goes first."""

    async def run(store: Store) -> None:
        for i in range(1, 5):
            await new_batch(store, f"a{i}", "a", expires_at=3000 if i != 3 else 2000)
        for i in range(1, 4):
            await new_batch(store, f"b{i}", "b", expires_at=3000)
        await new_batch(store, "c1", "c", expires_at=3000)
        order = []
        while (job := await store.claim_validation("v", 100.0, 30)) is not None:
            order.append(job["id"])
            if len(order) > 1:  # the first stays held: a validation still running counts too
                await start(store, job["id"], 1, 3000)
        assert order == ["a3", "b1", "c1", "a1", "b2", "a2", "b3", "a4"]

    on_store(db_url, run)
