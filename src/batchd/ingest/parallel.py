"""Validation of a big file on every core: byte ranges in worker processes, merged in order.

The file is cut into ``processes`` byte ranges at line boundaries (a few small ranged reads
find the newlines); each range is validated by ``RangeValidator`` in its own process, which
streams it from the blob store (local directory or S3) in blocks. The custom_id hashes go to
sorted runs on disk (``idset``), so no process holds all of them; each process then checks one
slice of the hash space across every run, and only when some hash repeats is the file read
once more to confirm the duplicates by their ids. The event loop only awaits futures.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from batchd.blobs import BlobStore
from batchd.ingest.idset import SPACE, RunWriter, repeated_in_runs, run_files
from batchd.ingest.validate import (
    IdFinder,
    Plan,
    RangeResult,
    RangeValidator,
    blocks_of,
    file_blocks,
    merge,
)

_PROBE = 64 * 1024


@dataclass(frozen=True)
class RangeJob:
    """What a worker process needs to validate one range (picklable)."""

    storage_url: str | None
    blob_dir: str
    key: str
    index: int
    start: int
    end: int
    endpoint: str
    chunk_lines: int
    max_lines: int
    max_errors: int
    max_line_bytes: int | None
    spill_dir: str
    id_bound: int


async def line_boundaries(blobs: BlobStore, key: str, size: int, parts: int) -> list[int]:
    """``parts + 1`` offsets from 0 to ``size``, each at the start of a line."""
    cuts = [0]
    for i in range(1, parts):
        at = max(size * i // parts, cuts[-1])
        while at < size:
            probe = await blobs.get_range(key, at, min(size, at + _PROBE))
            nl = probe.find(b"\n")
            if nl >= 0:
                at += nl + 1
                break
            at += len(probe)
        cuts.append(min(at, size))
    cuts.append(size)
    return cuts


def _blocks(job: RangeJob) -> Iterator[tuple[bytes, int]]:
    """The range's blocks: straight from the file on a local store (this process has no
    event loop to keep free), else streamed from the object store."""
    blobs = BlobStore.from_url(job.storage_url, Path(job.blob_dir))
    path = blobs.local_path(job.key)
    if path is not None:
        yield from file_blocks(path, job.start, job.end, job.max_line_bytes)
        return

    # S3: one range at a time, in slices, so a process holds a slice, not the range.
    step = 64 * 1024 * 1024
    at = job.start
    while at < job.end:
        upto = min(job.end, at + step)
        got = asyncio.run(_fetch_slice(blobs, job.key, at, upto, job.end, job.max_line_bytes))
        if not got:
            return
        yield from got
        at = got[-1][1] + len(got[-1][0])


async def _fetch_slice(
    blobs: BlobStore, key: str, start: int, upto: int, end: int, max_line: int | None
) -> list[tuple[bytes, int]]:
    """Blocks from ``start`` through the line that crosses ``upto`` (at most ``end``)."""
    out: list[tuple[bytes, int]] = []
    async for block, offset in blocks_of(blobs, key, start, end, max_line):
        out.append((block, offset))
        if offset + len(block) >= upto:
            break
    return out


def _validate_range(job: RangeJob) -> RangeResult:
    writer = RunWriter(Path(job.spill_dir), str(job.index), job.id_bound)
    checker = RangeValidator(
        job.endpoint,
        chunk_lines=job.chunk_lines,
        max_lines=job.max_lines,
        max_errors=job.max_errors,
        max_line_bytes=job.max_line_bytes,
        at_file_start=job.start == 0,
        on_ids=writer.add_many,
    )
    for block, offset in _blocks(job):
        if not checker.feed(block, offset):
            break
    writer.close()
    return checker.finish()


def _find_in_range(job: RangeJob, wanted: set[int]) -> list[tuple[int, str]]:
    finder = IdFinder(wanted, at_file_start=job.start == 0, cap=job.max_errors + 1)
    for block, _ in _blocks(job):
        finder.feed(block)
    return finder.found


def _repeats(spill_dir: str, bound: int, cap: int, lo: int, hi: int) -> set[int]:
    return repeated_in_runs(run_files(Path(spill_dir)), bound, cap, lo, hi)


# What the fork server imports once, so that each range process forked from it starts in
# milliseconds: this module, and the CLI that ``batchd serve`` / ``batchd worker`` run as their
# main module (every child imports the parent's main module again; with the CLI already loaded
# that import is a lookup instead of ~0.15 s of imports per child).
_PRELOAD = ["batchd.cli", __name__]


def _context() -> multiprocessing.context.BaseContext:
    """Fork the range processes from a clean server process (forkserver, started once with
    ``_PRELOAD`` imported): each validation then starts its processes in milliseconds instead
    of a fresh interpreter per process, and never forks a parent that runs threads."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def prestart() -> None:
    """Start the fork server now (blocking, ~0.7 s of imports in the new process), so the
    first big file does not wait for it."""
    if _context().get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


async def validate_parallel(
    blobs: BlobStore,
    key: str,
    size: int,
    *,
    storage_url: str | None,
    blob_dir: Path,
    endpoint: str,
    chunk_lines: int,
    max_lines: int,
    max_errors: int,
    max_line_bytes: int | None,
    id_bound: int,
    processes: int,
    work_dir: Path,
) -> Plan:
    cuts = await line_boundaries(blobs, key, size, processes)
    spill = Path(tempfile.mkdtemp(prefix="validate-", dir=work_dir))
    jobs = [
        RangeJob(
            storage_url=storage_url,
            blob_dir=str(blob_dir),
            key=key,
            index=i,
            start=cuts[i],
            end=cuts[i + 1],
            endpoint=endpoint,
            chunk_lines=chunk_lines,
            max_lines=max_lines,
            max_errors=max_errors,
            max_line_bytes=max_line_bytes,
            spill_dir=str(spill),
            id_bound=id_bound,
        )
        for i in range(processes)
        if cuts[i + 1] > cuts[i]
    ]
    loop = asyncio.get_running_loop()
    pool = ProcessPoolExecutor(max_workers=processes, mp_context=_context())
    try:
        results = list(await asyncio.gather(*(loop.run_in_executor(pool, _validate_range, j) for j in jobs)))
        # The hash space in one slice per process; each process holds ``id_bound`` at a time.
        edges = [SPACE * i // processes for i in range(processes + 1)]
        cap = 10 * max_errors
        found = await asyncio.gather(
            *(
                loop.run_in_executor(pool, _repeats, str(spill), id_bound, cap, lo, hi)
                for lo, hi in itertools.pairwise(edges)
            )
        )
        repeated = set().union(*found)
        duplicates: list[tuple[int, str]] = []
        if repeated:
            per_range = await asyncio.gather(
                *(loop.run_in_executor(pool, _find_in_range, j, repeated) for j in jobs)
            )
            base = 0
            for result, hits in zip(results, per_range, strict=True):
                duplicates.extend((n + base, cid) for n, cid in hits)
                base += result.lines
    finally:
        await asyncio.to_thread(pool.shutdown, True)
        await asyncio.to_thread(shutil.rmtree, spill, True)
    return merge(results, duplicates, max_lines=max_lines, max_errors=max_errors)
