"""Webhook queries: project secrets, admin endpoints, and the delivery outbox.

The outbox rows of a batch's terminal event are inserted by ``enqueue_batch_events`` inside the
transaction that sets the terminal status (``Store.finish_batch``, ``Store.fail_batch``), so
no crash can end a batch without its event. Deliveries are leased like chunks: one worker
sends each row at a time, and every outcome is fenced by the lease owner.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, delete, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from batchd.store.tables import batches, webhook_deliveries, webhook_endpoints, webhook_secrets

Row = dict[str, Any]
TERMINAL_EVENTS = ("completed", "failed", "expired", "cancelled")


def _row(r: Any) -> Row:
    return dict(r._mapping)


def event_id() -> str:
    return "evt_" + secrets.token_hex(16)


async def enqueue_batch_events(conn: AsyncConnection, batch_id: str, status: str, now: int) -> int:
    """Insert one outbox row per destination of ``batch.<status>``: the batch's own
    ``webhook_url`` and the project's endpoints (one row per distinct URL). Call it inside the
    transaction that moves the batch to ``status``."""
    if status not in TERMINAL_EVENTS:
        return 0
    batch = (
        await conn.execute(select(batches.c.project, batches.c.webhook_url).where(batches.c.id == batch_id))
    ).first()
    if batch is None:
        return 0
    project, own_url = batch
    dests: dict[str, str | None] = {}
    q = select(webhook_endpoints.c.id, webhook_endpoints.c.url).where(webhook_endpoints.c.project == project)
    for ep_id, url in await conn.execute(q.order_by(webhook_endpoints.c.seq)):
        dests.setdefault(url, ep_id)
    if own_url:
        dests.setdefault(own_url, None)
    if not dests:
        return 0
    evt = event_id()
    rows = [
        {
            "event_id": evt,
            "event_type": f"batch.{status}",
            "event_created_at": now,
            "project": project,
            "batch_id": batch_id,
            "url": url,
            "endpoint_id": ep_id,
            "state": "pending",
            "attempts": 0,
            "next_attempt_at": float(now),
        }
        for url, ep_id in dests.items()
    ]
    await conn.execute(insert(webhook_deliveries), rows)
    return len(rows)


class WebhookQueries:
    """Mixed into ``Store``: it supplies ``engine`` and ``_picked``."""

    engine: AsyncEngine

    if TYPE_CHECKING:

        def _picked(self, pick: Any, name: str, of: Any = None) -> Any: ...

    # ------------------------------------------------------------------------- secrets

    async def webhook_secret(self, project: str) -> Row | None:
        q = select(webhook_secrets).where(webhook_secrets.c.project == project)
        async with self.engine.connect() as conn:
            r = (await conn.execute(q)).first()
        return _row(r) if r else None

    async def ensure_webhook_secret(self, project: str, secret: str, now: int) -> bool:
        """Store ``secret`` for the project unless it has one; True when it was stored."""
        try:
            async with self.engine.begin() as conn:
                exists = (
                    await conn.execute(
                        select(webhook_secrets.c.project).where(webhook_secrets.c.project == project)
                    )
                ).first()
                if exists is not None:
                    return False
                await conn.execute(
                    insert(webhook_secrets).values(project=project, secret=secret, created_at=now)
                )
        except IntegrityError:  # another process created it first
            return False
        return True

    async def rotate_webhook_secret(self, project: str, secret: str, now: int, grace: int) -> Row:
        """Replace the project's secret; the old one keeps signing for ``grace`` seconds."""
        if await self.ensure_webhook_secret(project, secret, now):
            return await self._secret_row(project)
        async with self.engine.begin() as conn:
            old = (
                await conn.execute(
                    select(webhook_secrets.c.secret).where(webhook_secrets.c.project == project)
                )
            ).scalar_one()
            await conn.execute(
                update(webhook_secrets)
                .where(webhook_secrets.c.project == project)
                .values(secret=secret, created_at=now, previous_secret=old, previous_until=now + grace)
            )
        return await self._secret_row(project)

    async def _secret_row(self, project: str) -> Row:
        row = await self.webhook_secret(project)
        assert row is not None
        return row

    # ----------------------------------------------------------------------- endpoints

    async def add_webhook_endpoint(self, **values: Any) -> Row:
        async with self.engine.begin() as conn:
            await conn.execute(insert(webhook_endpoints).values(**values))
        return values

    async def list_webhook_endpoints(self, project: str) -> list[Row]:
        q = (
            select(webhook_endpoints)
            .where(webhook_endpoints.c.project == project)
            .order_by(webhook_endpoints.c.seq)
        )
        async with self.engine.connect() as conn:
            return [_row(r) for r in await conn.execute(q)]

    async def delete_webhook_endpoint(self, project: str, endpoint_id: str) -> bool:
        """Remove an endpoint; deliveries already queued for it still run."""
        q = delete(webhook_endpoints).where(
            webhook_endpoints.c.project == project, webhook_endpoints.c.id == endpoint_id
        )
        async with self.engine.begin() as conn:
            return (await conn.execute(q)).rowcount == 1

    # ---------------------------------------------------------------------- deliveries

    async def list_webhook_deliveries(
        self, project: str, *, batch_id: str | None = None, limit: int = 20
    ) -> list[Row]:
        """The project's newest deliveries first."""
        q = select(webhook_deliveries).where(webhook_deliveries.c.project == project)
        if batch_id is not None:
            q = q.where(webhook_deliveries.c.batch_id == batch_id)
        q = q.order_by(webhook_deliveries.c.seq.desc()).limit(limit)
        async with self.engine.connect() as conn:
            return [_row(r) for r in await conn.execute(q)]

    async def lease_webhook_deliveries(self, owner: str, now: float, ttl: float, n: int) -> list[Row]:
        """Lease up to ``n`` due deliveries and count the attempt now (a crash mid-send still
        uses one up). A read first, so an idle poll takes no write lock on SQLite."""
        due = and_(
            webhook_deliveries.c.state == "pending",
            webhook_deliveries.c.next_attempt_at <= now,
            or_(webhook_deliveries.c.lease_owner.is_(None), webhook_deliveries.c.lease_expires_at < now),
        )
        async with self.engine.connect() as conn:
            if (await conn.execute(select(webhook_deliveries.c.seq).where(due).limit(1))).first() is None:
                return []
        pick = self._picked(
            select(webhook_deliveries.c.seq)
            .where(due)
            .order_by(webhook_deliveries.c.next_attempt_at)
            .limit(n),
            "picked_delivery",
        )
        q = (
            update(webhook_deliveries)
            .where(webhook_deliveries.c.seq == pick.c.seq, due)
            .values(
                lease_owner=owner,
                lease_expires_at=now + ttl,
                attempts=webhook_deliveries.c.attempts + 1,
            )
            .returning(*webhook_deliveries.c)
        )
        async with self.engine.begin() as conn:
            return [_row(r) for r in await conn.execute(q)]

    async def record_webhook_attempt(
        self,
        seq: int,
        owner: str,
        *,
        state: str,
        status: int | None,
        error: str | None,
        next_attempt_at: float | None,
        now: int,
    ) -> bool:
        """Record one attempt's outcome and give the lease back; False when the lease was lost."""
        values: dict[str, Any] = {
            "state": state,
            "last_status": status,
            "last_error": error,
            "lease_owner": None,
            "lease_expires_at": None,
        }
        if next_attempt_at is not None:
            values["next_attempt_at"] = next_attempt_at
        if state == "delivered":
            values["delivered_at"] = now
        q = (
            update(webhook_deliveries)
            .where(webhook_deliveries.c.seq == seq, webhook_deliveries.c.lease_owner == owner)
            .values(**values)
        )
        async with self.engine.begin() as conn:
            return (await conn.execute(q)).rowcount == 1

    async def release_webhook_leases(self, owner: str) -> int:
        """A restarted worker gives back the deliveries its previous life held."""
        q = (
            update(webhook_deliveries)
            .where(webhook_deliveries.c.lease_owner == owner)
            .values(lease_owner=None, lease_expires_at=None)
        )
        async with self.engine.begin() as conn:
            return int((await conn.execute(q)).rowcount)
