"""The bounded custom_id set: in memory, spilled to disk, and the duplicate confirmation."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from batchd.blobs import BlobStore
from batchd.ingest.idset import SPACE, IdSet, RunWriter, id_hash, repeated_in_runs, run_files
from batchd.ingest.validate import merge, validate_file


def test_in_memory_repeats() -> None:
    ids = IdSet(bound=1000)
    ids.add_many([id_hash("a"), id_hash("b")])
    ids.add_many([id_hash("c"), id_hash("a"), id_hash("c")])
    assert not ids.spilled
    assert ids.finish() == {id_hash("a"), id_hash("c")}


def test_forced_spill_finds_a_duplicate_across_spills(tmp_path: Path) -> None:
    ids = IdSet(bound=8, spill_dir=tmp_path)
    try:
        for i in range(100):
            ids.add_many([id_hash(f"id-{i}")])
        ids.add_many([id_hash("id-3")])  # its first occurrence was spilled long ago
        assert ids.spilled and len(ids.mem) < 8
        assert list(tmp_path.glob("batchd-ids-*/run-*.u64"))
        assert ids.finish() == {id_hash("id-3")}
    finally:
        ids.close()
    assert not list(tmp_path.glob("batchd-ids-*"))


def test_runs_past_the_bound_are_checked_a_slice_at_a_time(tmp_path: Path) -> None:
    """Two writers (two range processes), runs of 100 hashes, 5,000 hashes: the check reads
    slices of about 100, across both writers' runs, and the two halves of the hash space
    (two checking processes) split the repeats between them."""
    step = SPACE // 5000
    hashes = [i * step + 7 for i in range(5000)]
    a, b = RunWriter(tmp_path, "0", 100), RunWriter(tmp_path, "1", 100)
    for i in range(0, 2500, 50):  # as a range validator does, a block at a time
        a.add_many(hashes[i : i + 50])
        b.add_many(hashes[2500 + i : 2550 + i])
    a.add_many([hashes[4321]])
    b.add_many([hashes[12]])
    a.close()
    b.close()
    files = run_files(tmp_path)
    assert len(files) == 52
    assert repeated_in_runs(files, bound=100, cap=10) == {hashes[4321], hashes[12]}
    half = SPACE // 2
    assert repeated_in_runs(files, 100, 10, 0, half) == {hashes[12]}
    assert repeated_in_runs(files, 100, 10, half, SPACE) == {hashes[4321]}
    assert len(repeated_in_runs(files, 100, 1)) == 1  # the cap


def test_same_hash_different_ids_is_not_a_duplicate() -> None:
    # A hash collision shows up as two different ids with a repeated hash: no error.
    plan = merge([], [(3, "a"), (9, "b")], max_lines=10, max_errors=10)
    assert [e["code"] for e in plan.errors] == ["empty_file"]
    plan = merge([], [(3, "a"), (9, "a"), (12, "a")], max_lines=10, max_errors=10)
    assert [(e["code"], e["line"]) for e in plan.errors[:2]] == [
        ("duplicate_custom_id", 9),
        ("duplicate_custom_id", 12),
    ]


def test_validation_reports_a_duplicate_past_the_spill_bound(tmp_path: Path) -> None:
    blobs = BlobStore.local(tmp_path / "blobs")
    rows = [f"r{i}" for i in range(60)]
    rows[49] = "r7"  # line 50 repeats line 8
    text = "".join(
        json.dumps({"custom_id": c, "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}) + "\n"
        for c in rows
    )

    async def run() -> list[tuple[str, int | None]]:
        await blobs.put("in", text.encode())
        plan = await validate_file(
            blobs,
            "in",
            endpoint="/v1/embeddings",
            chunk_lines=10,
            max_lines=100,
            max_errors=10,
            id_bound=5,
            spill_dir=tmp_path,
        )
        return [(e["code"], e["line"]) for e in plan.errors]

    assert asyncio.run(run()) == [("duplicate_custom_id", 50)]
