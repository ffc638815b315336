"""The Store: intent-named operations over the metadata tables.

Every state change that must be atomic is one transaction here. Chunk work is fenced by a
generation number: a worker commits results only while its (owner, generation) still holds
the chunk, so a worker that lost its lease can never add a result twice.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, delete, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from batchd.store.engine import make_engine
from batchd.store.tables import (
    api_keys,
    batches,
    chunks,
    files,
    projects,
    result_parts,
    upload_parts,
    uploads,
)
from batchd.store.webhooks import WebhookQueries, enqueue_batch_events

Row = dict[str, Any]
ACTIVE_STATUSES = ("validating", "in_progress", "finalizing", "cancelling")
QUOTA_COLUMNS = ("max_stored_bytes", "max_active_batches", "max_queued_lines", "max_queued_tokens")


@dataclass(frozen=True)
class PartCommit:
    """One checkpoint of a chunk: result blobs already written, counts and usage to add."""

    batch_id: str
    chunk_idx: int
    generation: int
    out_key: str | None
    out_bytes: int
    out_lines: int
    err_key: str | None
    err_bytes: int
    err_lines: int
    done_bitmap: bytes
    completed: int
    failed: int
    usage: tuple[int, int, int, int, int]
    chunk_done: bool
    # Compaction: this part holds exactly the lines of the parts with these blob keys (same
    # chunk and generation), which it replaces; its lines and counts are not added again.
    replaces: tuple[str, ...] = ()


def _row(r: Any) -> Row:
    return dict(r._mapping)


class Store(WebhookQueries):
    def __init__(self, engine: AsyncEngine):
        self.engine = engine
        self.is_postgres = engine.dialect.name == "postgresql"

    @classmethod
    def open(cls, url: str) -> Store:
        return cls(make_engine(url))

    async def close(self) -> None:
        await self.engine.dispose()

    # ----------------------------------------------------------------------------- files

    async def insert_file(self, **values: Any) -> Row:
        async with self.engine.begin() as conn:
            await conn.execute(insert(files).values(**values))
        return {**values, "deleted_at": None}

    async def get_file(self, project: str, file_id: str) -> Row | None:
        q = select(files).where(
            files.c.id == file_id, files.c.project == project, files.c.deleted_at.is_(None)
        )
        async with self.engine.connect() as conn:
            r = (await conn.execute(q)).first()
        return _row(r) if r else None

    async def list_files(
        self, project: str, *, purpose: str | None, limit: int, order: str, after: str | None
    ) -> tuple[list[Row], bool] | None:
        """A page of the project's files; None when ``after`` names no file of the project."""
        where = [files.c.project == project, files.c.deleted_at.is_(None)]
        if purpose:
            where.append(files.c.purpose == purpose)
        async with self.engine.connect() as conn:
            if after:
                seq = await self._seq_of(conn, files, project, after)
                if seq is None:
                    return None
                where.append(files.c.seq < seq if order == "desc" else files.c.seq > seq)
            key = files.c.seq.desc() if order == "desc" else files.c.seq.asc()
            q = select(files).where(*where).order_by(key).limit(limit + 1)
            rows = [_row(r) for r in (await conn.execute(q))]
        return rows[:limit], len(rows) > limit

    async def delete_file(self, project: str, file_id: str, now: int) -> bool:
        """Hide the file at once; its bytes go when no running batch reads them (``purge``)."""
        q = (
            update(files)
            .where(files.c.id == file_id, files.c.project == project, files.c.deleted_at.is_(None))
            .values(deleted_at=now)
        )
        async with self.engine.begin() as conn:
            return (await conn.execute(q)).rowcount == 1

    async def files_to_purge(self, now: int, limit: int = 100) -> list[Row]:
        """Deleted or expired files that no active batch still reads."""
        in_use = select(batches.c.input_file_id).where(batches.c.status.in_(ACTIVE_STATUSES))
        q = (
            select(files)
            .where(
                or_(files.c.deleted_at.is_not(None), files.c.expires_at <= now),
                files.c.id.not_in(in_use),
            )
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            return [_row(r) for r in await conn.execute(q)]

    async def purge_file(self, file_id: str) -> list[str]:
        """Remove a file row; returns the blob keys that nothing references any more."""
        async with self.engine.begin() as conn:
            row = (await conn.execute(select(files).where(files.c.id == file_id))).first()
            if row is None:
                return []
            f = _row(row)
            await conn.execute(delete(files).where(files.c.id == file_id))
            if f["blob_key"]:
                return [f["blob_key"]]
            key_col = result_parts.c.out_key if f["stream"] == "output" else result_parts.c.err_key
            keys = await conn.execute(
                select(key_col).where(result_parts.c.batch_id == f["batch_id"], key_col.is_not(None))
            )
            return [k for (k,) in keys]

    async def known_blob_keys(self, keys: list[str]) -> set[str]:
        q = select(files.c.blob_key).where(files.c.blob_key.in_(keys))
        async with self.engine.connect() as conn:
            return {k for (k,) in await conn.execute(q)}

    # --------------------------------------------------------------------------- batches

    async def insert_batch(self, **values: Any) -> Row:
        async with self.engine.begin() as conn:
            await conn.execute(insert(batches).values(**values))
            r = (await conn.execute(select(batches).where(batches.c.id == values["id"]))).one()
        return _row(r)

    async def get_batch(self, batch_id: str, project: str | None = None) -> Row | None:
        q = select(batches).where(batches.c.id == batch_id)
        if project is not None:
            q = q.where(batches.c.project == project)
        async with self.engine.connect() as conn:
            r = (await conn.execute(q)).first()
        return _row(r) if r else None

    async def list_batches(
        self, project: str, *, limit: int, after: str | None
    ) -> tuple[list[Row], bool] | None:
        where = [batches.c.project == project]
        async with self.engine.connect() as conn:
            if after:
                seq = await self._seq_of(conn, batches, project, after)
                if seq is None:
                    return None
                where.append(batches.c.seq < seq)
            q = select(batches).where(*where).order_by(batches.c.seq.desc()).limit(limit + 1)
            rows = [_row(r) for r in await conn.execute(q)]
        return rows[:limit], len(rows) > limit

    async def request_cancel(self, project: str, batch_id: str, now: int) -> Row | None:
        """Move an active batch to ``cancelling``; other states are left as they are."""
        async with self.engine.begin() as conn:
            await conn.execute(
                update(batches)
                .where(
                    batches.c.id == batch_id,
                    batches.c.project == project,
                    batches.c.status.in_(("validating", "in_progress")),
                )
                .values(status="cancelling", cancelling_at=now, paused_at=None)
            )
            r = (
                await conn.execute(
                    select(batches).where(batches.c.id == batch_id, batches.c.project == project)
                )
            ).first()
        return _row(r) if r else None

    async def has_active_batches(self) -> bool:
        q = select(batches.c.id).where(batches.c.status.in_(ACTIVE_STATUSES)).limit(1)
        async with self.engine.connect() as conn:
            return (await conn.execute(q)).first() is not None

    async def runnable_batches(self, ids: Iterable[str]) -> set[str]:
        """Those of ``ids`` whose chunks may still be dispatched: in progress, not paused."""
        ids = list(ids)
        if not ids:
            return set()
        q = select(batches.c.id).where(
            batches.c.id.in_(ids), batches.c.status == "in_progress", batches.c.paused_at.is_(None)
        )
        async with self.engine.connect() as conn:
            return {i for (i,) in await conn.execute(q)}

    # ------------------------------------------------- pause, progress, metrics (extensions)

    async def set_paused(self, project: str, batch_id: str, paused_at: int | None) -> Row | None:
        """Pause (``paused_at`` = now) or resume (None) an active batch; a batch already in
        that state, or one that is not active, is left as it is. Returns the row either way."""
        paused = batches.c.paused_at.is_(None) if paused_at is not None else batches.c.paused_at.is_not(None)
        async with self.engine.begin() as conn:
            await conn.execute(
                update(batches)
                .where(
                    batches.c.id == batch_id,
                    batches.c.project == project,
                    batches.c.status.in_(("validating", "in_progress")),
                    paused,
                )
                .values(paused_at=paused_at)
            )
            r = (
                await conn.execute(
                    select(batches).where(batches.c.id == batch_id, batches.c.project == project)
                )
            ).first()
        return _row(r) if r else None

    async def recent_lines(self, ids: Sequence[str], since: float) -> dict[str, int]:
        """Lines each batch committed since ``since`` (its recent throughput)."""
        if not ids:
            return {}
        q = (
            select(result_parts.c.batch_id, func.sum(result_parts.c.out_lines + result_parts.c.err_lines))
            .where(result_parts.c.batch_id.in_(list(ids)), result_parts.c.committed_at >= since)
            .group_by(result_parts.c.batch_id)
        )
        async with self.engine.connect() as conn:
            return {b: int(n or 0) for b, n in await conn.execute(q)}

    async def metrics_snapshot(self, now: float) -> Row:
        """Batches by status, paused batches, and the unfinished chunks and lines of active
        batches (grouped counts over indexed columns; no per-row work)."""
        by_status = select(batches.c.status, func.count()).group_by(batches.c.status)
        paused = select(func.count()).where(
            batches.c.paused_at.is_not(None), batches.c.status.in_(("validating", "in_progress"))
        )
        queue = (
            select(chunks.c.state, func.count(), func.sum(chunks.c.line_count - chunks.c.done_lines))
            .join(batches, batches.c.id == chunks.c.batch_id)
            .where(
                chunks.c.state != "done",
                chunks.c.expires_at > now,
                batches.c.status == "in_progress",
            )
            .group_by(chunks.c.state)
        )
        async with self.engine.connect() as conn:
            statuses = {st: int(n) for st, n in await conn.execute(by_status)}
            n_paused = int((await conn.execute(paused)).scalar_one())
            chunk_states: dict[str, int] = {}
            lines = 0
            for state, n, left in await conn.execute(queue):
                chunk_states[state] = int(n)
                lines += int(left or 0)
        return {"batches": statuses, "paused": n_paused, "chunks": chunk_states, "lines": lines}

    # ------------------------------------------------------------------ batch-level jobs

    async def claim_validation(self, owner: str, now: float, ttl: float) -> Row | None:
        """Lease one ``validating`` batch whose deadline has not passed, fairly: the project
        with the fewest batches in progress or being validated goes first (so projects
        alternate), earliest deadline first within a project. In creation order, a project
        that created its batches last would have all of them validated last, and have nothing
        to dispatch while the others run."""
        cond = and_(
            batches.c.status == "validating",
            batches.c.expires_at > now,
            or_(batches.c.job_owner.is_(None), batches.c.job_expires_at < now),
        )
        busy = (
            select(batches.c.project, func.count().label("n"))
            .where(
                or_(
                    batches.c.status == "in_progress",
                    and_(batches.c.status == "validating", batches.c.job_expires_at >= now),
                )
            )
            .group_by(batches.c.project)
            .subquery("busy")
        )
        turn = func.row_number().over(
            partition_by=batches.c.project, order_by=(batches.c.expires_at, batches.c.seq)
        )
        ranked = (
            select(batches.c.id, (func.coalesce(busy.c.n, 0) + turn).label("key"))
            .select_from(batches.outerjoin(busy, busy.c.project == batches.c.project))
            .where(cond)
            .subquery("ranked")
        )
        # The lock (PostgreSQL) is taken a level above the window function, as in lease_chunks.
        pick = (
            select(batches.c.id)
            .join(ranked, ranked.c.id == batches.c.id)
            .where(cond)
            .order_by(ranked.c.key, batches.c.seq)
            .limit(1)
        )
        return await self._claim_job(cond, owner, now, ttl, pick)

    async def finalize_candidates(self, now: float, limit: int = 50) -> list[Row]:
        """Batches whose dispatch is over: all chunks done, cancelled or past the deadline,
        with no live chunk lease (in-flight requests finish first)."""
        open_chunks = (
            select(func.count())
            .where(chunks.c.batch_id == batches.c.id, chunks.c.state != "done")
            .scalar_subquery()
        )
        live = (
            select(func.count())
            .where(
                chunks.c.batch_id == batches.c.id,
                chunks.c.state == "leased",
                chunks.c.lease_expires_at >= now,
            )
            .scalar_subquery()
        )
        q = (
            select(batches.c.id, batches.c.status, batches.c.expires_at, open_chunks, live)
            .where(
                or_(
                    batches.c.status.in_(("in_progress", "finalizing", "cancelling")),
                    and_(batches.c.status == "validating", batches.c.expires_at <= now),
                ),
                or_(batches.c.job_owner.is_(None), batches.c.job_expires_at < now),
            )
            .order_by(batches.c.seq)
            .limit(limit * 20)
        )
        out: list[Row] = []
        async with self.engine.connect() as conn:
            for bid, status, expires_at, n_open, n_live in await conn.execute(q):
                ending = status in ("finalizing", "cancelling", "validating") or expires_at <= now
                if (n_open == 0 or (ending and n_live == 0)) and len(out) < limit:
                    out.append({"id": bid, "status": status})
        return out

    async def claim_finalization(self, batch_id: str, owner: str, now: float, ttl: float) -> Row | None:
        cond = and_(
            batches.c.id == batch_id,
            batches.c.status.in_(ACTIVE_STATUSES),
            or_(batches.c.job_owner.is_(None), batches.c.job_expires_at < now),
        )
        pick = select(batches.c.id).where(cond).order_by(batches.c.seq).limit(1)
        return await self._claim_job(cond, owner, now, ttl, pick)

    async def renew_job(self, batch_id: str, owner: str, now: float, ttl: float) -> bool:
        q = (
            update(batches)
            .where(batches.c.id == batch_id, batches.c.job_owner == owner)
            .values(job_expires_at=now + ttl)
        )
        async with self.engine.begin() as conn:
            return (await conn.execute(q)).rowcount == 1

    async def _claim_job(self, cond: Any, owner: str, now: float, ttl: float, pick: Any) -> Row | None:
        """Take the batch ``pick`` selects (one id) for this owner's job, if ``cond`` holds."""
        picked = self._picked(pick, "picked_batch", of=batches)
        q = (
            update(batches)
            .where(batches.c.id == picked.c.id, cond)
            .values(job_owner=owner, job_expires_at=now + ttl)
            .returning(*batches.c)
        )
        async with self.engine.begin() as conn:
            r = (await conn.execute(q)).first()
        return _row(r) if r else None

    async def start_batch(
        self,
        batch_id: str,
        owner: str,
        *,
        model: str | None,
        total: int,
        chunk_rows: Sequence[Row],
        expires_at: int,
        now: int,
    ) -> bool:
        """Validation passed: record the chunk plan and move to ``in_progress``.

        A batch cancelled while it validated keeps ``cancelling`` but gets its plan too, so
        its lines can be reported as cancelled.
        """
        async with self.engine.begin() as conn:
            res = await conn.execute(
                update(batches)
                .where(
                    batches.c.id == batch_id,
                    batches.c.job_owner == owner,
                    batches.c.status.in_(("validating", "cancelling")),
                )
                .values(
                    model=model,
                    total=total,
                    chunk_count=len(chunk_rows),
                    job_owner=None,
                    job_expires_at=None,
                )
            )
            if res.rowcount != 1:
                return False
            await conn.execute(delete(chunks).where(chunks.c.batch_id == batch_id))
            for i in range(0, len(chunk_rows), 500):
                part = [
                    {**c, "state": "pending", "generation": 0, "done_lines": 0, "expires_at": expires_at}
                    for c in chunk_rows[i : i + 500]
                ]
                await conn.execute(insert(chunks), part)
            await conn.execute(
                update(batches)
                .where(batches.c.id == batch_id, batches.c.status == "validating")
                .values(status="in_progress", in_progress_at=now)
            )
        return True

    async def fail_batch(self, batch_id: str, owner: str, *, errors_json: str, total: int, now: int) -> bool:
        q = (
            update(batches)
            .where(
                batches.c.id == batch_id,
                batches.c.job_owner == owner,
                batches.c.status.in_(("validating", "cancelling")),
            )
            .values(
                status="failed",
                errors=errors_json,
                failed_at=now,
                total=total,
                job_owner=None,
                job_expires_at=None,
            )
        )
        async with self.engine.begin() as conn:
            if (await conn.execute(q)).rowcount != 1:
                return False
            await enqueue_batch_events(conn, batch_id, "failed", now)
        return True

    # ---------------------------------------------------------------------------- chunks

    async def lease_chunks(
        self, owner: str, now: float, ttl: float, n: int, per_batch: int | None = None
    ) -> list[Row]:
        """Lease up to ``n`` runnable chunks, fairly; bumps the generation.

        One statement per lease round (see ``_fair_pick``): round-robin across projects,
        earliest deadline first within a project, and at most ``per_batch`` chunks of one
        batch held by this owner at once, so a huge batch leaves room for the others.
        """
        runnable = and_(
            or_(
                chunks.c.state == "pending",
                and_(chunks.c.state == "leased", chunks.c.lease_expires_at < now),
            ),
            chunks.c.expires_at > now,
        )
        ranked = self._fair_pick(
            and_(batches.c.status == "in_progress", batches.c.paused_at.is_(None)), owner, now, n, per_batch
        )
        # Row locks (PostgreSQL) are taken a level above the window functions, which
        # FOR UPDATE cannot share a SELECT with; the ranking reads without locks, so
        # ``runnable`` is checked again on the locked rows.
        pick = (
            select(chunks.c.batch_id, chunks.c.idx)
            .join(ranked, and_(ranked.c.batch_id == chunks.c.batch_id, ranked.c.idx == chunks.c.idx))
            .where(runnable)
        )
        picked = self._picked(pick, "picked_chunks", of=chunks)
        q = (
            update(chunks)
            .where(chunks.c.batch_id == picked.c.batch_id, chunks.c.idx == picked.c.idx, runnable)
            .values(
                state="leased",
                lease_owner=owner,
                lease_expires_at=now + ttl,
                generation=chunks.c.generation + 1,
            )
            .returning(*chunks.c)
        )
        async with self.engine.begin() as conn:
            return [_row(r) for r in await conn.execute(q)]

    @staticmethod
    def _fair_pick(batch_ok: Any, owner: str, now: float, n: int, per_batch: int | None) -> Any:
        """The ``n`` chunks to lease next, as a subquery of (batch_id, idx).

        Candidates: of each runnable batch, its first ``k`` pending chunks (found through
        ``ix_chunks_batch_state``, so the cost follows the number of batches, not of chunks),
        plus chunks whose lease ran out. ``in_batch`` numbers a batch's candidates; with the
        chunks this owner already holds of the batch it must stay within ``per_batch``.
        ``turn`` numbers the rest per project, earliest deadline first (then batch, then
        chunk); adding the project's live leases (all owners) gives the sort key, so the
        project holding fewest chunks goes first and equal projects alternate: round-robin.
        """
        k = min(n, per_batch) if per_batch is not None else n
        later = chunks.alias("later")
        kth_pending = (
            select(later.c.idx)
            .where(later.c.batch_id == batches.c.id, later.c.state == "pending")
            .order_by(later.c.idx)
            .offset(k - 1)
            .limit(1)
            .correlate(batches)
            .scalar_subquery()
        )
        runnable_batches = (
            select(batches.c.id, func.coalesce(kth_pending, 2**31 - 1).label("upto"))
            .where(batch_ok)
            .cte("runnable_batches")
            .prefix_with("MATERIALIZED")  # drive from the batches, then each one's index range
        )
        cols = (chunks.c.batch_id, chunks.c.idx, chunks.c.expires_at)
        first_pending = (
            select(*cols)
            .join(runnable_batches, runnable_batches.c.id == chunks.c.batch_id)
            .where(
                chunks.c.state == "pending",
                chunks.c.idx <= runnable_batches.c.upto,
                chunks.c.expires_at > now,
            )
        )
        timed_out = select(*cols).where(
            chunks.c.state == "leased", chunks.c.lease_expires_at < now, chunks.c.expires_at > now
        )
        pool = first_pending.union_all(timed_out).subquery("pool")
        live = and_(chunks.c.state == "leased", chunks.c.lease_expires_at >= now)
        held = (
            select(chunks.c.batch_id, func.count().label("n"))
            .where(live, chunks.c.lease_owner == owner)
            .group_by(chunks.c.batch_id)
            .subquery("held")
        )
        busy = (
            select(batches.c.project, func.count().label("n"))
            .select_from(chunks.join(batches, batches.c.id == chunks.c.batch_id))
            .where(live)
            .group_by(batches.c.project)
            .subquery("busy")
        )
        cand = (
            select(
                pool.c.batch_id,
                pool.c.idx,
                pool.c.expires_at,
                batches.c.seq,
                batches.c.project,
                func.row_number().over(partition_by=pool.c.batch_id, order_by=pool.c.idx).label("in_batch"),
                func.coalesce(held.c.n, 0).label("held"),
            )
            .select_from(
                pool.join(batches, batches.c.id == pool.c.batch_id).outerjoin(
                    held, held.c.batch_id == pool.c.batch_id
                )
            )
            .where(batch_ok)
            .subquery("cand")
        )
        capped = select(
            cand.c.batch_id,
            cand.c.idx,
            cand.c.expires_at,
            cand.c.seq,
            cand.c.project,
            func.row_number()
            .over(partition_by=cand.c.project, order_by=(cand.c.expires_at, cand.c.seq, cand.c.idx))
            .label("turn"),
        )
        if per_batch is not None:
            capped = capped.where(cand.c.in_batch + cand.c.held <= per_batch)
        ranked = capped.subquery("capped")
        return (
            select(ranked.c.batch_id, ranked.c.idx)
            .select_from(ranked.outerjoin(busy, busy.c.project == ranked.c.project))
            .order_by(
                ranked.c.turn + func.coalesce(busy.c.n, 0),
                ranked.c.expires_at,
                ranked.c.seq,
                ranked.c.idx,
            )
            .limit(n)
            .subquery("ranked")
        )

    async def heartbeat(
        self, owner: str, held: Iterable[tuple[str, int, int]], now: float, ttl: float
    ) -> set[tuple[str, int]]:
        """Extend our leases; returns the (batch, chunk) keys we no longer hold."""
        lost = set()
        async with self.engine.begin() as conn:
            for batch_id, idx, gen in held:
                res = await conn.execute(
                    update(chunks)
                    .where(
                        chunks.c.batch_id == batch_id,
                        chunks.c.idx == idx,
                        chunks.c.lease_owner == owner,
                        chunks.c.generation == gen,
                        chunks.c.state == "leased",
                    )
                    .values(lease_expires_at=now + ttl)
                )
                if res.rowcount != 1:
                    lost.add((batch_id, idx))
        return lost

    async def active_workers(self, now: float) -> int:
        """Workers holding a live chunk lease: the ones spending upstream budget now."""
        q = select(func.count(func.distinct(chunks.c.lease_owner))).where(
            chunks.c.state == "leased", chunks.c.lease_expires_at >= now
        )
        async with self.engine.connect() as conn:
            return int((await conn.execute(q)).scalar() or 0)

    async def done_bitmaps(self, batch_id: str, idx: int) -> list[bytes]:
        q = select(result_parts.c.done_bitmap).where(
            result_parts.c.batch_id == batch_id, result_parts.c.chunk_idx == idx
        )
        async with self.engine.connect() as conn:
            return [b for (b,) in await conn.execute(q)]

    async def commit_part(self, owner: str, part: PartCommit, now: float, ttl: float) -> bool:
        """Record one checkpoint, fenced by (owner, generation). False: the lease is lost and
        the caller must drop these results (their blobs are orphans, never read)."""
        lines = part.out_lines + part.err_lines
        added = 0 if part.replaces else lines
        values: dict[str, Any] = {"done_lines": chunks.c.done_lines + added}
        if part.chunk_done:
            values.update(state="done", lease_owner=None, lease_expires_at=None)
        else:
            values.update(lease_expires_at=now + ttl)
        async with self.engine.begin() as conn:
            res = await conn.execute(
                update(chunks)
                .where(
                    chunks.c.batch_id == part.batch_id,
                    chunks.c.idx == part.chunk_idx,
                    chunks.c.lease_owner == owner,
                    chunks.c.generation == part.generation,
                    chunks.c.state == "leased",
                )
                .values(**values)
            )
            if res.rowcount != 1:
                return False
            if part.replaces:
                await self._drop_parts(conn, part)
            if lines:
                await self._insert_part(conn, part)
            if added:
                it, ct, ot, rt, tt = part.usage
                await conn.execute(
                    update(batches)
                    .where(batches.c.id == part.batch_id)
                    .values(
                        completed=batches.c.completed + part.completed,
                        failed=batches.c.failed + part.failed,
                        input_tokens=batches.c.input_tokens + it,
                        cached_tokens=batches.c.cached_tokens + ct,
                        output_tokens=batches.c.output_tokens + ot,
                        reasoning_tokens=batches.c.reasoning_tokens + rt,
                        total_tokens=batches.c.total_tokens + tt,
                    )
                )
        return True

    async def release_chunk(self, owner: str, batch_id: str, idx: int, generation: int) -> None:
        """Give a chunk back (cancel, expiry, shutdown) so the finalizer or another worker
        can take it at once instead of waiting for the lease to run out."""
        q = (
            update(chunks)
            .where(
                chunks.c.batch_id == batch_id,
                chunks.c.idx == idx,
                chunks.c.lease_owner == owner,
                chunks.c.generation == generation,
                chunks.c.state == "leased",
            )
            .values(state="pending", lease_owner=None, lease_expires_at=None)
        )
        async with self.engine.begin() as conn:
            await conn.execute(q)

    async def input_blob_key(self, batch_id: str) -> str:
        """The input file's blob, also after the file was deleted (its bytes outlive the
        row's visibility until the batch ends)."""
        q = (
            select(files.c.blob_key)
            .join(batches, batches.c.input_file_id == files.c.id)
            .where(batches.c.id == batch_id)
        )
        async with self.engine.connect() as conn:
            return str((await conn.execute(q)).scalar_one())

    async def get_chunk(self, batch_id: str, idx: int) -> Row | None:
        q = select(chunks).where(chunks.c.batch_id == batch_id, chunks.c.idx == idx)
        async with self.engine.connect() as conn:
            r = (await conn.execute(q)).first()
        return _row(r) if r else None

    async def release_owner(self, owner: str) -> int:
        """A restarted worker gives back every chunk and job its previous life still held."""
        async with self.engine.begin() as conn:
            res = await conn.execute(
                update(chunks)
                .where(chunks.c.lease_owner == owner, chunks.c.state == "leased")
                .values(state="pending", lease_owner=None, lease_expires_at=None)
            )
            await conn.execute(
                update(batches)
                .where(batches.c.job_owner == owner)
                .values(job_owner=None, job_expires_at=None)
            )
        return int(res.rowcount)

    async def chunk_plan(self, batch_id: str) -> list[Row]:
        q = select(chunks).where(chunks.c.batch_id == batch_id).order_by(chunks.c.idx)
        async with self.engine.connect() as conn:
            return [_row(r) for r in await conn.execute(q)]

    # -------------------------------------------------------------------------- finalize

    async def parts(self, batch_id: str) -> list[Row]:
        q = (
            select(result_parts)
            .where(result_parts.c.batch_id == batch_id)
            .order_by(result_parts.c.chunk_idx, result_parts.c.id)
        )
        async with self.engine.connect() as conn:
            return [_row(r) for r in await conn.execute(q)]

    async def finish_batch(
        self,
        batch_id: str,
        owner: str,
        *,
        status: str,
        stamps: dict[str, int],
        tail: PartCommit | None,
        output_file: Row | None,
        error_file: Row | None,
    ) -> bool:
        """The one transaction that ends a batch: tail part, result files, terminal status,
        and the webhook outbox rows of its event."""
        async with self.engine.begin() as conn:
            res = await conn.execute(
                update(batches)
                .where(
                    batches.c.id == batch_id,
                    batches.c.job_owner == owner,
                    batches.c.status.in_(ACTIVE_STATUSES),
                )
                .values(
                    status=status,
                    output_file_id=output_file["id"] if output_file else None,
                    error_file_id=error_file["id"] if error_file else None,
                    job_owner=None,
                    job_expires_at=None,
                    **stamps,
                )
            )
            if res.rowcount != 1:
                return False
            if tail is not None:
                await self._insert_part(conn, tail)
            for f in (output_file, error_file):
                if f is not None:
                    await conn.execute(insert(files).values(**f))
            await enqueue_batch_events(conn, batch_id, status, stamps.get(f"{status}_at") or int(time.time()))
        return True

    async def set_status(self, batch_id: str, owner: str, status: str, stamps: dict[str, int]) -> None:
        q = (
            update(batches)
            .where(batches.c.id == batch_id, batches.c.job_owner == owner)
            .values(status=status, **stamps)
        )
        async with self.engine.begin() as conn:
            await conn.execute(q)

    async def part_keys(self, batch_id: str) -> set[str]:
        q = select(result_parts.c.out_key, result_parts.c.err_key).where(result_parts.c.batch_id == batch_id)
        async with self.engine.connect() as conn:
            return {k for row in await conn.execute(q) for k in row if k}

    async def view_parts(self, batch_id: str, stream: str) -> list[tuple[str, int]]:
        """The blobs of a result file, in order."""
        key, size = (
            (result_parts.c.out_key, result_parts.c.out_bytes)
            if stream == "output"
            else (result_parts.c.err_key, result_parts.c.err_bytes)
        )
        q = (
            select(key, size)
            .where(result_parts.c.batch_id == batch_id, key.is_not(None))
            .order_by(result_parts.c.chunk_idx, result_parts.c.id)
        )
        async with self.engine.connect() as conn:
            return [(k, n) for k, n in await conn.execute(q)]

    # ------------------------------------------------------------------ keys and projects

    async def create_api_key(self, **values: Any) -> Row:
        async with self.engine.begin() as conn:
            await conn.execute(insert(api_keys).values(**values))
        return {**values, "revoked_at": None}

    async def find_api_key(self, key_hash: str) -> Row | None:
        """The key with this hash, revoked or not."""
        async with self.engine.connect() as conn:
            r = (await conn.execute(select(api_keys).where(api_keys.c.key_hash == key_hash))).first()
        return _row(r) if r else None

    async def count_live_api_keys(self) -> int:
        q = select(func.count()).select_from(api_keys).where(api_keys.c.revoked_at.is_(None))
        async with self.engine.connect() as conn:
            return int((await conn.execute(q)).scalar_one())

    async def list_api_keys(self, project: str | None = None) -> list[Row]:
        q = select(api_keys).order_by(api_keys.c.created_at, api_keys.c.id)
        if project is not None:
            q = q.where(api_keys.c.project == project)
        async with self.engine.connect() as conn:
            return [_row(r) for r in await conn.execute(q)]

    async def revoke_api_key(self, key_id: str, now: int) -> Row | None:
        """Revoke a key (idempotent); None when there is no such key."""
        async with self.engine.begin() as conn:
            await conn.execute(
                update(api_keys)
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=now)
            )
            r = (await conn.execute(select(api_keys).where(api_keys.c.id == key_id))).first()
        return _row(r) if r else None

    async def project_quota_overrides(self, project: str) -> Row:
        async with self.engine.connect() as conn:
            r = (await conn.execute(select(projects).where(projects.c.name == project))).first()
        row = _row(r) if r else {}
        return {c: row.get(c) for c in QUOTA_COLUMNS}

    async def set_project_quotas(self, project: str, overrides: dict[str, int | None], now: int) -> Row:
        """Set (or clear, with None) the given overrides; others are left as they are."""
        values = {k: v for k, v in overrides.items() if k in QUOTA_COLUMNS}
        async with self.engine.begin() as conn:
            exists = (await conn.execute(select(projects.c.name).where(projects.c.name == project))).first()
            if exists is None:
                await conn.execute(insert(projects).values(name=project, created_at=now, **values))
            elif values:
                await conn.execute(update(projects).where(projects.c.name == project).values(**values))
        return await self.project_quota_overrides(project)

    async def project_usage(self, project: str) -> Row:
        """What a project holds now: stored bytes, active batches, and the lines and estimated
        tokens its active batches have not finished yet."""
        stored = select(func.coalesce(func.sum(files.c.bytes), 0)).where(
            files.c.project == project, files.c.deleted_at.is_(None)
        )
        # Parts of uploads count too: they are stored bytes until the upload completes (into a
        # file) or ends (and they are deleted).
        parts = (
            select(func.coalesce(func.sum(upload_parts.c.bytes), 0))
            .join(uploads, uploads.c.id == upload_parts.c.upload_id)
            .where(uploads.c.project == project)
        )
        active = (
            select(
                batches.c.total, batches.c.completed, batches.c.failed, files.c.line_count, files.c.est_tokens
            )
            .join(files, files.c.id == batches.c.input_file_id)
            .where(batches.c.project == project, batches.c.status.in_(ACTIVE_STATUSES))
        )
        lines = tokens = n_active = 0
        async with self.engine.connect() as conn:
            stored_bytes = int((await conn.execute(stored)).scalar_one())
            stored_bytes += int((await conn.execute(parts)).scalar_one())
            for total, completed, failed, line_count, est in await conn.execute(active):
                n_active += 1
                planned = total or line_count or 0
                left = max(0, planned - (completed or 0) - (failed or 0))
                lines += left
                if planned and est:
                    tokens += est * left // planned
        return {
            "stored_bytes": stored_bytes,
            "active_batches": n_active,
            "queued_lines": lines,
            "queued_tokens": tokens,
        }

    # --------------------------------------------------------------------------- uploads

    async def insert_upload(self, **values: Any) -> Row:
        async with self.engine.begin() as conn:
            await conn.execute(insert(uploads).values(**values))
        return {**values, "file_id": None}

    async def get_upload(self, project: str, upload_id: str) -> Row | None:
        q = select(uploads).where(uploads.c.id == upload_id, uploads.c.project == project)
        async with self.engine.connect() as conn:
            r = (await conn.execute(q)).first()
        return _row(r) if r else None

    async def add_upload_part(self, **values: Any) -> bool:
        """Record a stored part; False when the upload is no longer pending."""
        async with self.engine.begin() as conn:
            status = (
                await conn.execute(select(uploads.c.status).where(uploads.c.id == values["upload_id"]))
            ).scalar()
            if status != "pending":
                return False
            await conn.execute(insert(upload_parts).values(**values))
        return True

    async def upload_parts_of(self, upload_id: str) -> list[Row]:
        q = select(upload_parts).where(upload_parts.c.upload_id == upload_id)
        async with self.engine.connect() as conn:
            return [_row(r) for r in await conn.execute(q)]

    async def end_upload(self, upload_id: str, status: str, file_row: Row | None = None) -> bool:
        """pending -> ``status`` (with the assembled file's row, inserted in the same
        transaction); False when the upload was no longer pending."""
        async with self.engine.begin() as conn:
            res = await conn.execute(
                update(uploads)
                .where(uploads.c.id == upload_id, uploads.c.status == "pending")
                .values(status=status, file_id=file_row["id"] if file_row else None)
            )
            if res.rowcount != 1:
                return False
            if file_row is not None:
                await conn.execute(insert(files).values(**file_row))
        return True

    async def known_part_keys(self, keys: list[str]) -> set[str]:
        q = select(upload_parts.c.blob_key).where(upload_parts.c.blob_key.in_(keys))
        async with self.engine.connect() as conn:
            return {k for (k,) in await conn.execute(q)}

    async def uploads_to_clean(self, now: int, limit: int = 100) -> list[Row]:
        """Pending uploads past their expiry, and ended uploads that still have parts."""
        has_parts = select(upload_parts.c.upload_id)
        q = (
            select(uploads)
            .where(
                or_(
                    and_(uploads.c.status == "pending", uploads.c.expires_at <= now),
                    and_(uploads.c.status != "pending", uploads.c.id.in_(has_parts)),
                )
            )
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            return [_row(r) for r in await conn.execute(q)]

    async def drop_upload_parts(self, upload_id: str, expire: bool) -> list[str]:
        """Forget an ended upload's parts (expiring it first if asked); returns their blob keys."""
        async with self.engine.begin() as conn:
            if expire:
                await conn.execute(
                    update(uploads)
                    .where(uploads.c.id == upload_id, uploads.c.status == "pending")
                    .values(status="expired")
                )
            status = (await conn.execute(select(uploads.c.status).where(uploads.c.id == upload_id))).scalar()
            if status == "pending":
                return []
            keys = [
                k
                for (k,) in await conn.execute(
                    select(upload_parts.c.blob_key).where(upload_parts.c.upload_id == upload_id)
                )
            ]
            await conn.execute(delete(upload_parts).where(upload_parts.c.upload_id == upload_id))
        return keys

    # ------------------------------------------------------------------------- dashboard

    async def dashboard_batches(
        self, project: str | None, *, recent: int, active_cap: int = 200
    ) -> list[Row]:
        """What the dashboard shows: every active batch (up to ``active_cap``) and the
        ``recent`` newest others, newest first; ``project=None`` means every project (admin)."""
        scope = [batches.c.project == project] if project is not None else []
        active = batches.c.status.in_(ACTIVE_STATUSES)
        newest = batches.c.seq.desc()
        async with self.engine.connect() as conn:
            rows = [
                _row(r)
                for q in (
                    select(batches).where(*scope, active).order_by(newest).limit(active_cap),
                    select(batches).where(*scope, ~active).order_by(newest).limit(recent),
                )
                for r in await conn.execute(q)
            ]
        return sorted(rows, key=lambda r: r["seq"], reverse=True)

    async def batch_status_counts(self, project: str | None) -> dict[str, int]:
        """How many batches are in each status (one project, or all for ``None``)."""
        q = select(batches.c.status, func.count()).group_by(batches.c.status)
        if project is not None:
            q = q.where(batches.c.project == project)
        async with self.engine.connect() as conn:
            return {status: int(n) for status, n in await conn.execute(q)}

    async def error_parts(self, batch_ids: Sequence[str]) -> list[tuple[str, str, int]]:
        """(batch id, blob key, bytes) of every error part of these batches."""
        if not batch_ids:
            return []
        q = (
            select(result_parts.c.batch_id, result_parts.c.err_key, result_parts.c.err_bytes)
            .where(result_parts.c.batch_id.in_(list(batch_ids)), result_parts.c.err_key.is_not(None))
            .order_by(result_parts.c.id)
        )
        async with self.engine.connect() as conn:
            return [(b, k, int(n)) for b, k, n in await conn.execute(q)]

    # --------------------------------------------------------------------------- helpers

    def _picked(self, pick: Any, name: str, of: Any = None) -> Any:
        """The rows to lease, as a CTE joined by the UPDATE. On PostgreSQL it is MATERIALIZED
        with ``FOR UPDATE SKIP LOCKED``: an ``IN (SELECT … LIMIT n FOR UPDATE)`` subquery may
        run more than once and lease more than ``n`` rows; concurrent workers skip each
        other's rows instead of waiting."""
        if not self.is_postgres:
            return pick.cte(name)
        return pick.with_for_update(of=of, skip_locked=True).cte(name).prefix_with("MATERIALIZED")

    @staticmethod
    async def _drop_parts(conn: AsyncConnection, part: PartCommit) -> None:
        """The parts a compacted part replaces (see ``PartCommit.replaces``)."""
        await conn.execute(
            delete(result_parts).where(
                result_parts.c.batch_id == part.batch_id,
                result_parts.c.chunk_idx == part.chunk_idx,
                result_parts.c.generation == part.generation,
                or_(result_parts.c.out_key.in_(part.replaces), result_parts.c.err_key.in_(part.replaces)),
            )
        )

    @staticmethod
    async def _insert_part(conn: AsyncConnection, part: PartCommit) -> None:
        await conn.execute(
            insert(result_parts).values(
                batch_id=part.batch_id,
                chunk_idx=part.chunk_idx,
                generation=part.generation,
                out_key=part.out_key,
                out_bytes=part.out_bytes,
                out_lines=part.out_lines,
                err_key=part.err_key,
                err_bytes=part.err_bytes,
                err_lines=part.err_lines,
                done_bitmap=part.done_bitmap,
                committed_at=time.time(),
            )
        )

    @staticmethod
    async def _seq_of(conn: AsyncConnection, table: Any, project: str, obj_id: str) -> int | None:
        q = select(table.c.seq).where(table.c.id == obj_id, table.c.project == project)
        return (await conn.execute(q)).scalar()
