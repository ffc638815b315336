"""The worker: leases chunks and sends their lines; validates and finalizes batches.

It reads like this: a stop event; a bounded queue of lines fed by one feeder per leased chunk;
``concurrency`` senders draining it (a line in backoff waits on a timer, not in a sender, and
comes back at the queue's front); side tasks for checkpoints, heartbeats, watching for
cancel and expiry, and the webhook outbox; and a loop that leases work, runs validation and
finalization jobs, and cleans up. ``run_until_idle`` serves tests and one-shot runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from batchd.blobs import BlobStore
from batchd.config import Settings
from batchd.engine.chunk_run import BatchInfo, ChunkRun, bitmap_to_int
from batchd.engine.dispatch import Backoff, LineRequest, SendPolicy, send_line
from batchd.engine.finalize import finalize_batch
from batchd.engine.identity import WorkerIdentity
from batchd.engine.janitor import purge_files, purge_uploads, sweep_orphans
from batchd.engine.journal import JournalDir, JournalKey, read_journal
from batchd.engine.lanes import Router, estimate_tokens
from batchd.engine.line_queue import LineQueue
from batchd.engine.validation import validate_next
from batchd.errors import BatchdError
from batchd.ingest.lines import clean, split_block
from batchd.ingest.lineshape import LIMITS, SENDABLE
from batchd.ingest.parallel import prestart as prestart_validation
from batchd.metrics import watch_worker
from batchd.store import Store
from batchd.store.store import Row
from batchd.webhooks.delivery import WebhookDeliverer

log = logging.getLogger(__name__)

# (chunk, line index, request, attempts spent so far)
QueueItem = tuple[ChunkRun, int, LineRequest, int]
# A line parked in backoff: ((batch, chunk), generation, line index)
ParkedKey = tuple[tuple[str, int], int, int]


class Worker:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        blobs: BlobStore,
        router: Router,
        *,
        identity: WorkerIdentity | None = None,
        journals: JournalDir | None = None,
    ):
        self.settings = settings
        self.store = store
        self.blobs = blobs
        self.router = router
        self.identity = identity or WorkerIdentity.ephemeral()
        self.owner = self.identity.owner
        self.journals = journals
        self.policy = SendPolicy(settings.request_timeout, settings.max_attempts)
        self.durable_window = settings.durable_window_on
        self.senders = min(router.capacity, 4096)
        self.queue: LineQueue[QueueItem] = LineQueue(2 * self.senders)
        self.backoffs: dict[ParkedKey, tuple[asyncio.TimerHandle, QueueItem]] = {}
        self.runs: dict[tuple[str, int], ChunkRun] = {}
        self.jobs: set[asyncio.Task[None]] = set()
        self.stop = asyncio.Event()
        self.wake = asyncio.Event()
        self._batches: dict[str, BatchInfo] = {}
        self._finalizing: set[str] = set()
        self._validating = 0
        self.webhooks = WebhookDeliverer(settings, store, self.owner)
        # Fair share inside the worker: leased chunks feed one queue in turn, and no batch
        # holds more than ``per_batch`` of them, so there is always room for another batch's
        # chunk while a huge one runs. ``per_batch`` still keeps every sender busy when one
        # batch is all there is.
        chunks_needed = -(-self.senders // settings.chunk_lines)
        self.per_batch = max(settings.max_chunks_per_batch, chunks_needed + 1)
        self.max_runs = max(settings.worker_max_chunks, self.per_batch + 2)
        watch_worker(self)

    # ------------------------------------------------------------------ life cycle

    async def run(self) -> None:
        """Work until ``stop`` is set, then drain in-flight requests and checkpoint."""
        await self._recover()
        senders = [asyncio.create_task(self._sender()) for _ in range(self.senders)]
        sides = [
            asyncio.create_task(self._every(self.settings.checkpoint_interval, self._checkpoint_all)),
            asyncio.create_task(self._every(self.settings.lease_seconds / 3, self._heartbeat)),
            asyncio.create_task(self._every(self.settings.poll_interval, self._watch_batches)),
            asyncio.create_task(self._every(1.0, self._share_budget)),
            asyncio.create_task(self._every(30.0, self._purge)),
            asyncio.create_task(self._every(self.settings.janitor_interval, self._sweep, at_start=True)),
            asyncio.create_task(self.webhooks.run(self.stop)),
            asyncio.create_task(self._prestart_validation()),
        ]
        try:
            while not self.stop.is_set():
                await self._tick()
                self.wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), self.settings.poll_interval)
        finally:
            await self._drain()
            for task in sides + senders:
                task.cancel()
            await asyncio.gather(*sides, *senders, return_exceptions=True)
            await self.webhooks.aclose()

    async def _prestart_validation(self) -> None:
        if not (self.settings.validation_prestart and self.settings.validation_processes > 1):
            return
        try:
            await asyncio.to_thread(prestart_validation)
        except (OSError, RuntimeError) as exc:  # the first big file will try again
            log.warning("could not start the validation fork server: %s", exc)

    async def run_until_idle(self, idle_ticks: int = 3) -> None:
        """Run until nothing is left to validate, dispatch or finalize (``batchd run``)."""
        runner = asyncio.create_task(self.run())
        quiet = 0
        while quiet < idle_ticks and not runner.done():
            await asyncio.sleep(self.settings.poll_interval)
            busy = self.runs or self.jobs or await self.store.has_active_batches()
            quiet = 0 if busy else quiet + 1
        self.stop.set()
        await runner

    async def _recover(self) -> None:
        """Commit what this identity's journals hold, then give back its old leases."""
        if not self.identity.stable:
            return
        if self.journals is not None:
            for key, path in self.journals.leftovers():
                await self._recover_journal(key, path)
                path.unlink(missing_ok=True)
        released = await self.store.release_owner(self.owner)
        if released:
            log.info("released %d chunk leases of a previous run", released, extra={"action": "recover"})

    async def _recover_journal(self, key: JournalKey, path: Path) -> None:
        chunk = await self.store.get_chunk(key.batch_id, key.idx)
        if chunk is None or chunk["lease_owner"] != self.owner or chunk["generation"] != key.generation:
            return  # taken over or finished elsewhere: the journal's results are not ours to commit
        run = ChunkRun(chunk=chunk, batch=await self._batch_info(key.batch_id), done=await self._done(chunk))
        recovered = 0
        for idx, result in read_journal(path):
            if not run.is_done(idx) and not (run.pending >> idx) & 1:
                run.outstanding += 1
                run.record(idx, result)
                recovered += 1
        await run.checkpoint(self.store, self.blobs, self.owner, final=True, ttl=self.settings.lease_seconds)
        log.info(
            "recovered %d results from a journal",
            recovered,
            extra={"batch_id": key.batch_id, "chunk_id": key.idx, "action": "recover"},
        )

    async def _done(self, chunk: Row) -> int:
        done = 0
        for bitmap in await self.store.done_bitmaps(chunk["batch_id"], chunk["idx"]):
            done |= bitmap_to_int(bitmap)
        return done

    async def _drain(self) -> None:
        """Stop feeding, let in-flight requests finish, checkpoint, give chunks back."""
        for run in self.runs.values():
            run.stopping = True
            self._retry_now(run)
        if self.runs:
            await asyncio.wait(
                [asyncio.create_task(r.settled.wait()) for r in self.runs.values()],
                timeout=self.settings.shutdown_grace,
            )
        if self.jobs:
            await asyncio.wait(self.jobs, timeout=self.settings.shutdown_grace)

    # ------------------------------------------------------------------ main loop

    async def _tick(self) -> None:
        await self._start_validation()
        await self._start_finalizations()
        await self._lease_more()

    async def _lease_more(self) -> None:
        room = self.max_runs - len(self.runs)
        if room <= 0:
            return
        leased = await self.store.lease_chunks(
            self.owner, time.time(), self.settings.lease_seconds, room, per_batch=self.per_batch
        )
        for chunk in leased:
            self._spawn(self._run_chunk(chunk))
        if leased:
            await self._share_budget()

    async def _start_validation(self) -> None:
        """Up to ``validation_jobs`` validations at once: a big file validating in worker
        processes does not hold back the small batches created after it."""
        if self._validating >= self.settings.validation_jobs:
            return
        self._validating += 1

        async def job() -> None:
            try:
                while not self.stop.is_set() and await validate_next(
                    self.store, self.blobs, self.settings, self.owner
                ):
                    self.wake.set()
                    self.webhooks.wake.set()  # a failed validation has an event to send
            finally:
                self._validating -= 1

        self._spawn(job())

    async def _start_finalizations(self) -> None:
        for cand in await self.store.finalize_candidates(time.time()):
            bid = cand["id"]
            if bid in self._finalizing or any(k[0] == bid for k in self.runs):
                continue
            self._finalizing.add(bid)

            async def job(bid: str = bid) -> None:
                try:
                    await finalize_batch(self.store, self.blobs, bid, self.owner, self.settings.lease_seconds)
                finally:
                    self._finalizing.discard(bid)
                    self._batches.pop(bid, None)
                    self.webhooks.wake.set()  # its event is in the outbox: send it now

            self._spawn(job())

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self.jobs.add(task)
        task.add_done_callback(self._job_done)

    def _job_done(self, task: asyncio.Task[None]) -> None:
        self.jobs.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("worker job failed", exc_info=task.exception())

    # ------------------------------------------------------------------ chunks

    async def _run_chunk(self, chunk: Row) -> None:
        run = ChunkRun(
            chunk=chunk, batch=await self._batch_info(chunk["batch_id"]), done=await self._done(chunk)
        )
        if self.journals is not None:
            run.journal = self.journals.open(JournalKey(run.batch.id, chunk["idx"], run.generation))
        if self.durable_window:
            run.kept = ([], [], [])
        self.runs[run.key] = run
        try:
            await self._feed(run)
            await run.settled.wait()
            await asyncio.shield(self._finish_chunk(run))
            run.close_journal()
        finally:
            run.end()
            self.runs.pop(run.key, None)
            self.wake.set()

    async def _feed(self, run: ChunkRun) -> None:
        try:
            block = await self.blobs.get_range(
                run.batch.input_key, run.chunk["byte_start"], run.chunk["byte_end"]
            )
            idx = 0
            for start, _end, raw in split_block(block, run.chunk["byte_start"]):
                text = clean(raw, start == 0)
                if text is None:
                    continue
                if not run.is_done(idx):
                    if run.should_stop():
                        break
                    request = _request_of(text, run.batch)
                    run.outstanding += 1
                    await self.queue.put((run, idx, request, 0))
                idx += 1
        finally:
            run.feeding_done = True
            run.check_settled()

    async def _finish_chunk(self, run: ChunkRun) -> None:
        ttl = self.settings.lease_seconds
        if run.kept is not None:  # what is still buffered first, so the final one can compact
            await run.checkpoint(self.store, self.blobs, self.owner, final=False, ttl=ttl)
        await run.checkpoint(self.store, self.blobs, self.owner, final=True, ttl=ttl)
        if not run.lost and (run.done != (1 << run.lines) - 1):
            await self.store.release_chunk(self.owner, run.batch.id, run.chunk["idx"], run.generation)

    async def _sender(self) -> None:
        while True:
            item = await self.queue.get()
            run, idx, request, attempt = item
            try:
                if run.should_stop():
                    run.record(idx, None)
                    continue
                result = await send_line(
                    self.router,
                    request,
                    deadline=run.batch.expires_at,
                    policy=self.policy,
                    stopping=run.should_stop,
                    attempt=attempt,
                    defer=True,
                )
                if isinstance(result, Backoff):
                    self._back_off((run, idx, request, result.attempt), result.delay)
                    continue
                run.record(idx, result)
                if self.durable_window:
                    if result is not None:
                        self._flush_soon(run)
                        await run.wait_durable(idx)
                elif run.buffered >= self.settings.checkpoint_lines and not run.lock.locked():
                    self._spawn(self._checkpoint(run))
            except Exception:
                log.exception("sending a line failed", extra={"batch_id": run.batch.id})
                run.record(idx, None)
                # A fault that repeats for every line must not turn into a hot loop of
                # release, re-lease and fail: each failing sender rests a moment.
                await asyncio.sleep(1.0)

    def _back_off(self, item: QueueItem, delay: float) -> None:
        """Park a line until its retry time; the sender goes on with other lines."""
        run, idx = item[0], item[1]
        key = (run.key, run.generation, idx)
        handle = asyncio.get_running_loop().call_later(delay, self._retry, key)
        self.backoffs[key] = (handle, item)

    def _retry(self, key: ParkedKey) -> None:
        parked = self.backoffs.pop(key, None)
        if parked is not None:
            self.queue.put_front(parked[1])

    def _retry_now(self, run: ChunkRun) -> None:
        """A stopping chunk's parked lines go back at once (to be settled as unfinished)."""
        for key in [k for k, (_, item) in self.backoffs.items() if item[0] is run]:
            handle, item = self.backoffs.pop(key)
            handle.cancel()
            self.queue.put_front(item)

    async def _batch_info(self, batch_id: str) -> BatchInfo:
        info = self._batches.get(batch_id)
        if info is None:
            row = await self.store.get_batch(batch_id)
            assert row is not None
            info = BatchInfo(
                id=batch_id,
                endpoint=row["endpoint"],
                path=row["endpoint"].removeprefix("/v1"),
                model=row["model"] or "",
                expires_at=row["expires_at"],
                input_key=await self.store.input_blob_key(batch_id),
            )
            self._batches[batch_id] = info
        return info

    # ------------------------------------------------------------------ side tasks

    async def _every(
        self, interval: float, action: Callable[[], Awaitable[None]], at_start: bool = False
    ) -> None:
        first = True
        while True:
            if not (first and at_start):
                await asyncio.sleep(interval)
            first = False
            try:
                await action()
            except (BatchdError, OSError, RuntimeError) as exc:
                log.warning("%s failed: %s", action.__name__, exc)
            except Exception:
                log.exception("%s failed", action.__name__)

    async def _checkpoint(self, run: ChunkRun) -> None:
        await asyncio.shield(
            run.checkpoint(self.store, self.blobs, self.owner, final=False, ttl=self.settings.lease_seconds)
        )

    def _flush_soon(self, run: ChunkRun) -> None:
        if not run.flushing:
            run.flushing = True
            self._spawn(self._flush(run))

    async def _flush(self, run: ChunkRun) -> None:
        """Group commit for the durable window: one checkpoint after another while results
        wait, each taking every result that arrived during the previous one."""
        try:
            while run.buffered and not run.lost:
                try:
                    await self._checkpoint(run)
                except Exception:
                    log.exception("checkpoint failed", extra={"batch_id": run.batch.id})
                    await asyncio.sleep(1.0)
        finally:
            run.flushing = False

    async def _checkpoint_all(self) -> None:
        for run in list(self.runs.values()):
            if run.buffered:
                await self._checkpoint(run)

    async def _share_budget(self) -> None:
        """Split every upstream's rate limits evenly among the workers that are sending."""
        if self.runs:
            active = await self.store.active_workers(time.time())
            self.router.set_share(1.0 / max(1, active))

    async def _heartbeat(self) -> None:
        held = [(r.batch.id, r.chunk["idx"], r.generation) for r in self.runs.values()]
        if not held:
            return
        lost = await self.store.heartbeat(self.owner, held, time.time(), self.settings.lease_seconds)
        for key in lost:
            if key in self.runs:
                self.runs[key].lost = True

    async def _watch_batches(self) -> None:
        """Stop feeding chunks of batches that were cancelled, paused (or ended elsewhere):
        in-flight requests finish, the chunk is checkpointed and released."""
        runnable = await self.store.runnable_batches({k[0] for k in self.runs})
        for (bid, _), run in list(self.runs.items()):
            if bid not in runnable:
                run.stopping = True
            if run.should_stop():
                self._retry_now(run)
                self.wake.set()

    async def _purge(self) -> None:
        await purge_files(self.store, self.blobs)
        await purge_uploads(self.store, self.blobs)

    async def _sweep(self) -> None:
        await sweep_orphans(self.store, self.blobs, self.settings.orphan_grace)


def _request_of(text: bytes, batch: BatchInfo) -> LineRequest:
    """What to send for a validated line: its body's bytes as the file holds them (numbers
    past 64 bits or a float's range stay as written), with its token estimate."""
    line = SENDABLE.decode(text)
    raw = bytes(line.body)
    tokens = estimate_tokens(len(raw), LIMITS.decode(raw).max_output())
    return LineRequest(line.custom_id, batch.model, batch.path, raw, tokens)
