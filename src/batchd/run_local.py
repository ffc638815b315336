"""``batchd run``: a batch file straight against an upstream, with the server's engine and no
server.

The point is to reuse everything the server guarantees (validation, retries, checkpoints,
exactly-once parts, journal recovery) rather than write a second, weaker fan-out loop. So the
command opens the same runtime as ``serve`` and ``worker`` (``runtime.open_runtime``: the
migrated Store, the BlobStore, a Worker with a stable WorkerIdentity and JournalDir) over a
small state directory beside the output (``OUT.jsonl.batchd/``), inserts the batch row itself,
and runs the worker until it is idle.

That directory holds one batch. Running the same command again finds it: after Ctrl-C or a
crash the worker's identity and journals carry on where the last process stopped, so only
unfinished lines are sent; after the batch ended, the output files are simply written again.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import orjson
from rich.console import Console

from batchd.blobs import BlobStore
from batchd.config import Settings
from batchd.console import (
    TERMINAL,
    CliExit,
    ExitCode,
    ProgressView,
    Snapshot,
    check_input,
    detect_endpoint,
    outcome,
)
from batchd.engine.worker import Worker
from batchd.ids import batch_id, file_id
from batchd.runtime import open_runtime
from batchd.store import Store
from batchd.store.store import Row

PROJECT = "default"  # the project the API uses; one per state directory is all we need
RUN_WINDOW = ("30d", 30 * 86400)  # a local run should not expire under a long job
COPY_CHUNK = 4 * 1024 * 1024
POLL_SECONDS = 0.5


@dataclass(frozen=True)
class RunPaths:
    source: Path
    output: Path
    errors: Path
    state: Path

    @classmethod
    def of(cls, source: Path, output: Path, errors: Path | None) -> RunPaths:
        stem = output.name.removesuffix(".jsonl")
        return cls(
            source=source,
            output=output,
            errors=errors or output.with_name(f"{stem}.errors.jsonl"),
            state=output.with_name(output.name + ".batchd"),
        )


@dataclass(frozen=True)
class Ended:
    """How a run ended; ``discard_state`` when nothing in the state is worth keeping."""

    code: ExitCode
    discard_state: bool = False


def run(paths: RunPaths, settings: Settings, console: Console) -> int:
    """Run (or resume) the file; returns the exit code."""
    # The state is the directory, whatever BATCHD_DATABASE_URL/BATCHD_STORAGE_URL say for a
    # server: a run must never find (or write) another batch.
    settings = settings.model_copy(
        update={"data_dir": paths.state, "database_url": None, "storage_url": None}
    )
    try:
        check_input(paths.source)
        endpoint = detect_endpoint(paths.source)
        with _exclusive(paths):
            ended = asyncio.run(_run(paths, settings, endpoint, console))
        if ended.discard_state:
            shutil.rmtree(paths.state, ignore_errors=True)
        return int(ended.code)
    except CliExit as exc:
        Console(stderr=True, highlight=False).print(f"batchd: {exc.message}", markup=False, soft_wrap=True)
        return int(exc.code)
    except KeyboardInterrupt:
        return int(ExitCode.INTERRUPTED)


def check_upstreams(settings: Settings) -> None:
    """Refuse to start when no upstream answers at all: every line would only burn its
    retries and land in the error file."""
    urls = [u.url for u in settings.upstreams()]
    problems = [p for p in (_unreachable(url) for url in urls) if p]
    if len(problems) == len(urls):
        raise CliExit(
            ExitCode.UNREACHABLE,
            f"cannot reach the upstream: {'; '.join(problems)}.\n"
            "Start the model server, or pass --upstream URL (an OpenAI-compatible base URL, e.g. "
            "http://127.0.0.1:8000/v1).",
        )


def _unreachable(url: str) -> str | None:
    """Why ``url`` cannot be reached, or None: any HTTP answer at all counts as reachable."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/models", timeout=5):
            return None
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return f"{url} ({getattr(exc, 'reason', exc)})"


@contextlib.contextmanager
def _exclusive(paths: RunPaths) -> Iterator[None]:
    """One ``batchd run`` per state directory: a second one would race the first for the
    same output files."""
    paths.state.mkdir(parents=True, exist_ok=True)
    with open(paths.state / "run.lock", "a") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise CliExit(
                ExitCode.USAGE,
                f"another `batchd run` is already writing {paths.output} (state in {paths.state}); "
                "wait for it, or choose another --output",
            ) from exc
        yield


async def _run(paths: RunPaths, settings: Settings, endpoint: str, console: Console) -> Ended:
    async with open_runtime(settings, with_worker=True) as rt:
        assert rt.worker is not None
        batch = await find_or_create(rt.store, rt.blobs, paths, endpoint, console)
        if batch["status"] not in TERMINAL:
            await asyncio.to_thread(check_upstreams, settings)
            batch = await execute(rt.worker, batch, console)
        if batch["status"] not in TERMINAL:
            raise CliExit(ExitCode.INTERRUPTED, _interrupted_message(batch, paths))
        return await conclude(rt.store, rt.blobs, batch, paths, console)


# ----------------------------------------------------------------------------- the batch


async def find_or_create(
    store: Store, blobs: BlobStore, paths: RunPaths, endpoint: str, console: Console
) -> Row:
    """The state directory's batch; on the first run, a copy of the input and a new batch."""
    page = await store.list_batches(PROJECT, limit=1, after=None)
    if page and page[0]:
        batch = page[0][0]
        await _check_same_input(store, batch, paths)
        if batch["status"] in TERMINAL:
            note = f"{batch['id']} already ended ({batch['status']}); writing its results again"
        else:
            note = f"resuming {batch['id']} from {paths.state}"
        console.print(note, markup=False, highlight=False)
        return batch
    source = await _store_input(store, blobs, paths.source)
    now = int(time.time())
    window, seconds = RUN_WINDOW
    batch = await store.insert_batch(
        id=batch_id(),
        project=PROJECT,
        endpoint=endpoint,
        model=None,
        input_file_id=source["id"],
        completion_window=window,
        status="validating",
        metadata=orjson.dumps({"source": "batchd run", "input": str(paths.source)}).decode(),
        output_expires_seconds=None,
        created_at=now,
        expires_at=now + seconds,
        total=0,
        completed=0,
        failed=0,
        input_tokens=0,
        cached_tokens=0,
        output_tokens=0,
        reasoning_tokens=0,
        total_tokens=0,
        chunk_count=0,
    )
    console.print(
        f"running {paths.source} as {batch['id']} (state in {paths.state})", markup=False, highlight=False
    )
    return batch


async def _store_input(store: Store, blobs: BlobStore, source: Path) -> Row:
    """Copy the input into the blob store, streaming, as an upload would."""
    fid = file_id()
    key = f"files/{fid}"
    writer = blobs.writer(key)
    with source.open("rb") as f:
        while data := f.read(COPY_CHUNK):
            await writer.write(data)
    await writer.close()
    return await store.insert_file(
        id=fid,
        project=PROJECT,
        filename=source.name,
        purpose="batch",
        bytes=writer.size,
        created_at=int(time.time()),
        expires_at=None,  # lives as long as the state directory
        blob_key=key,
        sha256=writer.sha256,
        batch_id=None,
        stream=None,
    )


async def _check_same_input(store: Store, batch: Row, paths: RunPaths) -> None:
    """Resuming with a different file would mix two inputs' results in one output."""
    stored = await store.get_file(PROJECT, batch["input_file_id"])
    size = paths.source.stat().st_size
    if (
        stored is None
        or stored["bytes"] != size
        or stored["sha256"] != await asyncio.to_thread(_sha256, paths.source)
    ):
        raise CliExit(
            ExitCode.USAGE,
            f"{paths.source} is not the file this run started with (state in {paths.state}).\n"
            f"To run the new file, delete {paths.state} or choose another --output.",
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while data := f.read(COPY_CHUNK):
            digest.update(data)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- running


async def execute(worker: Worker, batch: Row, console: Console) -> Row:
    """Run the worker until the batch ends or a signal stops it; returns the batch row."""
    loop = asyncio.get_running_loop()
    _stop_on_signals(worker, console)
    try:
        with ProgressView(console) as view:
            watcher = asyncio.create_task(_watch(worker.store, batch["id"], view))
            try:
                await worker.run_until_idle()
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            row = await _batch(worker.store, batch["id"])
            if row["status"] in TERMINAL:
                view.finish(_snapshot(row))
        return row
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _stop_on_signals(worker: Worker, console: Console) -> None:
    """First Ctrl-C/SIGTERM: stop feeding, let requests in flight finish, checkpoint (the
    server's drain). Second: leave at once; the journal keeps every answered line."""
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if worker.stop.is_set():
            os._exit(int(ExitCode.INTERRUPTED))
        console.print(
            "stopping: letting requests in flight finish and saving results (Ctrl-C again quits at once)",
            markup=False,
            highlight=False,
        )
        worker.stop.set()
        worker.wake.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)


async def _watch(store: Store, bid: str, view: ProgressView) -> None:
    while True:
        view.update(_snapshot(await _batch(store, bid)))
        await asyncio.sleep(POLL_SECONDS)


async def _batch(store: Store, bid: str) -> Row:
    row = await store.get_batch(bid)
    assert row is not None, f"{bid} vanished from the state directory"
    return row


def _snapshot(row: Row) -> Snapshot:
    return Snapshot(row["id"], row["status"], row["completed"], row["failed"], row["total"])


def _interrupted_message(batch: Row, paths: RunPaths) -> str:
    s = _snapshot(batch)
    return (
        f"interrupted: {s.done}/{s.total} lines are done and saved in {paths.state}.\n"
        "Run the same command again to send the rest; finished lines are not sent again."
    )


# ----------------------------------------------------------------------------- results


async def conclude(store: Store, blobs: BlobStore, batch: Row, paths: RunPaths, console: Console) -> Ended:
    """Write OUT and ERR from the result files, byte for byte what the server would serve."""
    if batch["status"] == "failed":
        _report_invalid(batch, paths)
        # Nothing was sent: drop the state, so the fixed file runs afresh instead of
        # failing the same-input check.
        return Ended(ExitCode.USAGE, discard_state=True)
    for fid in (batch["output_file_id"], batch["error_file_id"]):
        if fid is not None and await store.get_file(PROJECT, fid) is None:
            raise CliExit(
                ExitCode.USAGE, f"the results in {paths.state} have expired; delete it and run again"
            )
    out_lines = await _write_stream(store, blobs, batch, "output", paths.output)
    err_lines = await _write_stream(store, blobs, batch, "error", paths.errors)
    console.print(
        f"output: {paths.output} ({out_lines} lines)\nerrors: {paths.errors} ({err_lines} lines)\n"
        f"state kept in {paths.state}: running this command again rewrites these files without "
        "sending anything; delete it to run the file afresh",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    if err_lines:
        console.print(
            f"some lines failed; each one's reason is in {paths.errors}", markup=False, highlight=False
        )
    return Ended(outcome(batch["status"], batch["failed"] or err_lines))


async def _write_stream(store: Store, blobs: BlobStore, batch: Row, stream: str, path: Path) -> int:
    """Concatenate the stream's parts (as ``GET /files/{id}/content`` does) into ``path``;
    an empty file when there is none, so the files on disk always belong to this run."""
    fid = batch["output_file_id" if stream == "output" else "error_file_id"]
    pieces = await store.view_parts(batch["id"], stream) if fid else []
    tmp = path.with_name(path.name + ".part")
    lines = 0
    with tmp.open("wb") as f:
        for key, size in pieces:
            if size:
                lines += await _copy_blob(blobs, key, f)
    os.replace(tmp, path)
    return lines


async def _copy_blob(blobs: BlobStore, key: str, f: IO[bytes]) -> int:
    lines = 0
    async for data in blobs.stream(key):
        f.write(data)
        lines += data.count(b"\n")
    return lines


def _report_invalid(batch: Row, paths: RunPaths) -> None:
    """Print the validation errors with their line numbers."""
    err = Console(stderr=True, highlight=False)
    err.print(f"batchd: {paths.source} failed validation; nothing was sent:", markup=False)
    data = orjson.loads(batch["errors"])["data"] if batch["errors"] else []
    for e in data:
        where = f"line {e['line']}: " if e.get("line") is not None else ""
        err.print(f"  {where}{e['code']}: {e['message']}", markup=False, soft_wrap=True)
    err.print("fix the file and run the same command again", markup=False)
