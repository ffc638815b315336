"""One leased chunk in flight: which lines are done, buffered results, checkpoints.

Results are buffered and written as one result part per checkpoint (every N lines or T
seconds): part blobs first, then one fenced transaction that records the part, marks its lines
done and adds to the batch's counts. A crash between the two leaves an unreferenced blob and
lines that will be sent again, never a duplicate line.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field

from batchd.blobs import BlobStore
from batchd.engine.journal import Journal
from batchd.engine.results import NO_USAGE, LineResult
from batchd.metrics import LINES_COMPLETED, LINES_ERROR, LINES_FAILED
from batchd.store import Store
from batchd.store.store import PartCommit, Row


def bitmap_to_int(data: bytes) -> int:
    return int.from_bytes(data, "little")


def int_to_bitmap(value: int, lines: int) -> bytes:
    return value.to_bytes((lines + 7) // 8, "little")


@dataclass
class BatchInfo:
    id: str
    endpoint: str
    path: str
    model: str
    expires_at: int
    input_key: str


@dataclass
class ChunkRun:
    chunk: Row
    batch: BatchInfo
    done: int
    out: list[bytes] = field(default_factory=list)
    err: list[bytes] = field(default_factory=list)
    pending: int = 0
    completed: int = 0
    failed: int = 0
    usage: list[int] = field(default_factory=lambda: [0, 0, 0, 0, 0])
    outstanding: int = 0
    feeding_done: bool = False
    stopping: bool = False
    lost: bool = False
    part_seq: int = 0
    journal: Journal | None = None
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Durable window (see ``wait_durable``): set, then replaced, after every checkpoint attempt.
    attempted: asyncio.Event = field(default_factory=asyncio.Event)
    flushing: bool = False
    ended: bool = False
    # Compaction (durable window): the lines and part keys this run committed, so the final
    # checkpoint can replace its many small parts with one (``None``: not kept).
    kept: tuple[list[bytes], list[bytes], list[str]] | None = None
    mine: int = 0
    kept_parts: int = 0

    @property
    def key(self) -> tuple[str, int]:
        return self.batch.id, self.chunk["idx"]

    @property
    def generation(self) -> int:
        return int(self.chunk["generation"])

    @property
    def lines(self) -> int:
        return int(self.chunk["line_count"])

    @property
    def buffered(self) -> int:
        return len(self.out) + len(self.err)

    def should_stop(self) -> bool:
        return self.stopping or self.lost or time.time() >= self.batch.expires_at

    def is_done(self, idx: int) -> bool:
        return bool((self.done >> idx) & 1)

    def record(self, idx: int, result: LineResult | None) -> None:
        self.outstanding -= 1
        if result is not None:
            if self.journal is not None:
                self.journal.append(idx, result)
            self.pending |= 1 << idx
            if result.ok:
                self.out.append(result.line)
                self.completed += 1
                u = result.usage
                if u is not NO_USAGE:
                    total = self.usage
                    total[0] += u[0]
                    total[1] += u[1]
                    total[2] += u[2]
                    total[3] += u[3]
                    total[4] += u[4]
            else:
                self.err.append(result.line)
                if result.http_error:
                    self.failed += 1
        self.check_settled()

    def close_journal(self) -> None:
        """The chunk is finished, released or lost: its journal has nothing left to recover."""
        if self.journal is not None:
            self.journal.close(remove=True)
            self.journal = None

    def check_settled(self) -> None:
        if self.feeding_done and self.outstanding == 0:
            self.settled.set()

    async def wait_durable(self, idx: int) -> None:
        """Until line ``idx``'s result is in a committed part, or can no longer be (the lease
        is lost, the run ended). A sender that waits here keeps its slot, so a worker never has
        more lines sent-but-not-durable than senders: all another worker may repeat if it dies."""
        while not (self.is_done(idx) or self.lost or self.ended):
            await self.attempted.wait()

    def _attempt_over(self) -> None:
        self.attempted.set()
        self.attempted = asyncio.Event()

    def end(self) -> None:
        """The run is over (done, released, lost): nobody waits on it any more."""
        self.ended = True
        self._attempt_over()

    async def checkpoint(
        self, store: Store, blobs: BlobStore, owner: str, *, final: bool, ttl: float
    ) -> None:
        """Persist buffered results; on the final call, also mark the chunk done if every
        line has a result. Serialised per chunk by ``lock``. Wakes ``wait_durable``."""
        try:
            await self._persist(store, blobs, owner, final=final, ttl=ttl)
        finally:
            self._attempt_over()

    async def _persist(self, store: Store, blobs: BlobStore, owner: str, *, final: bool, ttl: float) -> None:
        async with self.lock:
            if self.lost:
                return
            full = (1 << self.lines) - 1
            chunk_done = final and (self.done | self.pending) == full
            if not self.buffered and not chunk_done:
                return
            if chunk_done and not self.buffered and self.kept is not None and self.kept_parts > 1:
                if not await self._compact(store, blobs, owner, ttl):
                    self.lost = True
                return
            out, err, pending = self.out, self.err, self.pending
            counts, usage = (self.completed, self.failed), tuple(self.usage)
            self.out, self.err, self.pending = [], [], 0
            self.completed = self.failed = 0
            self.usage = [0, 0, 0, 0, 0]
            try:
                ok = await self._commit(
                    store, blobs, owner, out, err, pending, counts, usage, chunk_done, ttl
                )
            except BaseException:
                # Keep the results for the next checkpoint rather than losing them.
                self.out, self.err = out + self.out, err + self.err
                self.pending |= pending
                self.completed += counts[0]
                self.failed += counts[1]
                self.usage = [a + b for a, b in zip(self.usage, usage, strict=True)]
                raise
            if ok:
                self.done |= pending
                LINES_COMPLETED.inc(counts[0])
                LINES_FAILED.inc(counts[1])
                LINES_ERROR.inc(len(err) - counts[1])
                if self.kept is not None and isinstance(ok, tuple):
                    self.kept[0].extend(out)
                    self.kept[1].extend(err)
                    self.kept[2].extend(ok)
                    self.mine |= pending
                    self.kept_parts += 1
            else:
                self.lost = True

    async def _commit(
        self,
        store: Store,
        blobs: BlobStore,
        owner: str,
        out: list[bytes],
        err: list[bytes],
        pending: int,
        counts: tuple[int, int],
        usage: tuple[int, ...],
        chunk_done: bool,
        ttl: float,
        replaces: tuple[str, ...] = (),
    ) -> tuple[str, ...] | bool:
        """Write one part (blobs, then the fenced row). Returns its blob keys (``True`` when
        it has none), or ``False`` when the lease was lost."""
        self.part_seq += 1
        # The random tail keeps keys unique across lives of the same (chunk, generation): a
        # recovered journal must never overwrite a part an earlier life already committed.
        stem = (
            f"batches/{self.batch.id}/parts/"
            f"{self.chunk['idx']:07d}.{self.generation}.{self.part_seq}.{secrets.token_hex(4)}"
        )
        out_data, err_data = b"".join(out), b"".join(err)
        out_key = f"{stem}.out.jsonl" if out_data else None
        err_key = f"{stem}.err.jsonl" if err_data else None
        if out_key:
            await blobs.put_durable(out_key, out_data)
        if err_key:
            await blobs.put_durable(err_key, err_data)
        part = PartCommit(
            batch_id=self.batch.id,
            chunk_idx=self.chunk["idx"],
            generation=self.generation,
            out_key=out_key,
            out_bytes=len(out_data),
            out_lines=len(out),
            err_key=err_key,
            err_bytes=len(err_data),
            err_lines=len(err),
            done_bitmap=int_to_bitmap(pending, self.lines),
            completed=counts[0],
            failed=counts[1],
            usage=usage,  # type: ignore[arg-type]
            chunk_done=chunk_done,
            replaces=replaces,
        )
        ok = await store.commit_part(owner, part, time.time(), ttl)
        keys = tuple(k for k in (out_key, err_key) if k)
        if not ok:
            for key in keys:
                await blobs.delete(key)
            return False
        return keys or True

    async def _compact(self, store: Store, blobs: BlobStore, owner: str, ttl: float) -> bool:
        """Replace the small parts this run committed with one, in the transaction that marks
        the chunk done: the output file of a chunk stays one blob per lease, however small the
        checkpoints were. The old blobs become unreferenced (the finalizer deletes them)."""
        assert self.kept is not None
        out, err, keys = self.kept
        ok = await self._commit(
            store, blobs, owner, out, err, self.mine, (0, 0), NO_USAGE, True, ttl, tuple(keys)
        )
        self.kept = None
        return ok is not False
