"""Delivering the outbox: lease due rows, POST each signed event, record what happened.

Runs inside every worker process. A row is leased before it is sent (``FOR UPDATE SKIP
LOCKED`` on PostgreSQL), so with several workers each event goes out from one of them at a
time; the attempt is counted at lease time, so a crash mid-send still uses one up. Failures
(connection errors, timeouts, refused addresses, any status but 2xx, redirects included) are
retried on ``BATCHD_WEBHOOK_RETRY_SCHEDULE`` with jitter until the attempts or
``BATCHD_WEBHOOK_MAX_AGE`` run out; every state lives in the database, so a restart goes on
where the last process stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
import orjson

from batchd import __version__
from batchd.config import Settings
from batchd.store import Store
from batchd.store.store import Row
from batchd.webhooks.policy import AddressPolicy, CheckedResolver, WebhookURLError
from batchd.webhooks.signing import new_secret, sign_headers

log = logging.getLogger(__name__)
ERROR_TEXT = 300  # characters of a failed response kept in ``last_error``


def event_body(row: Row) -> bytes:
    """The event as OpenAI sends it: ``{"id", "object", "created_at", "type", "data": {"id"}}``."""
    return orjson.dumps(
        {
            "id": row["event_id"],
            "object": "event",
            "created_at": row["event_created_at"],
            "type": row["event_type"],
            "data": {"id": row["batch_id"]},
        }
    )


def next_attempt(
    attempts: int,
    first_at: float,
    now: float,
    schedule: Sequence[float],
    max_age: float,
    rand: Callable[[], float] = random.random,
) -> float | None:
    """When to try again after ``attempts`` failed attempts, or None to give up: the
    schedule's wait, jittered by +-20%, while attempts remain and the event is younger than
    ``max_age``."""
    if attempts > len(schedule):
        return None
    at = now + schedule[attempts - 1] * (0.8 + 0.4 * rand())
    if at > first_at + max_age:
        return None
    return at


@dataclass(frozen=True)
class Outcome:
    ok: bool
    status: int | None = None
    error: str | None = None


def where(url: str) -> str:
    """Scheme, host and port only: paths and queries often carry a receiver's token."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def policy_of(settings: Settings) -> AddressPolicy:
    return AddressPolicy.build(settings.webhook_allow_http, settings.webhook_allow_networks)


async def signing_keys(store: Store, project: str, now: float) -> list[str]:
    """The project's secret (made now if it has none) and, during a rotation's grace, the
    previous one."""
    row = await store.webhook_secret(project)
    if row is None:
        await store.ensure_webhook_secret(project, new_secret(), int(now))
        row = await store.webhook_secret(project)
        assert row is not None
    keys = [row["secret"]]
    if row["previous_secret"] and (row["previous_until"] or 0) > now:
        keys.append(row["previous_secret"])
    return keys


class WebhookDeliverer:
    def __init__(self, settings: Settings, store: Store, owner: str):
        self.settings = settings
        self.store = store
        self.owner = owner
        self.policy = policy_of(settings)
        self.wake = asyncio.Event()
        self.inflight: set[asyncio.Task[Outcome]] = set()
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                resolver=CheckedResolver(self.policy),
                use_dns_cache=False,
                limit=self.settings.webhook_concurrency,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self.settings.webhook_timeout),
                trust_env=False,  # never through an environment proxy: it would resolve for us
            )
        return self._session

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until ``stop``; woken early by ``wake`` (a batch just ended here)."""
        await self.store.release_webhook_leases(self.owner)
        while not stop.is_set():
            self.wake.clear()
            try:
                await self.deliver_due()
            except (OSError, RuntimeError) as exc:
                log.warning("webhook delivery poll failed: %s", exc, extra={"action": "webhook"})
            except Exception:
                log.exception("webhook delivery poll failed", extra={"action": "webhook"})
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.settings.webhook_poll_interval)

    async def deliver_due(self) -> int:
        """Lease what is due (as many as there is room for) and start sending it."""
        room = self.settings.webhook_concurrency - len(self.inflight)
        if room <= 0:
            return 0
        ttl = self.settings.webhook_timeout + 30.0
        rows = await self.store.lease_webhook_deliveries(self.owner, time.time(), ttl, room)
        for row in rows:
            task = asyncio.create_task(self.deliver(row))
            self.inflight.add(task)
            task.add_done_callback(self._done)
        return len(rows)

    def _done(self, task: asyncio.Task[Outcome]) -> None:
        self.inflight.discard(task)
        self.wake.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("webhook delivery failed", exc_info=task.exception())

    async def deliver(self, row: Row) -> Outcome:
        """One attempt for one leased row, recorded before it returns."""
        now = time.time()
        try:
            # Again at every attempt: settings may have tightened, and aiohttp does not pass
            # literal addresses through the resolver.
            self.policy.check_url(row["url"])
            body = event_body(row)
            keys = await signing_keys(self.store, row["project"], now)
            headers = {
                **sign_headers(keys, row["event_id"], int(now), body),
                "content-type": "application/json",
                "user-agent": f"batchd/{__version__} (webhooks)",
            }
            outcome = await self._post(row["url"], body, headers)
        except WebhookURLError as exc:
            outcome = Outcome(False, None, str(exc))
        await self._record(row, outcome)
        return outcome

    async def _post(self, url: str, body: bytes, headers: dict[str, str]) -> Outcome:
        try:
            async with self._client().post(url, data=body, headers=headers, allow_redirects=False) as resp:
                if 200 <= resp.status < 300:
                    return Outcome(True, resp.status)
                text = (await resp.content.read(ERROR_TEXT)).decode(errors="replace")
                return Outcome(False, resp.status, f"HTTP {resp.status}: {text}".strip())
        except TimeoutError:
            return Outcome(False, None, f"no answer within {self.settings.webhook_timeout:g}s")
        except aiohttp.ClientError as exc:
            return Outcome(False, None, f"{type(exc).__name__}: {exc}"[:ERROR_TEXT])

    async def _record(self, row: Row, outcome: Outcome) -> None:
        now = time.time()
        retry_at = None
        if outcome.ok:
            state = "delivered"
        else:
            retry_at = next_attempt(
                row["attempts"],
                row["event_created_at"],
                now,
                self.settings.webhook_retry_schedule,
                self.settings.webhook_max_age,
            )
            state = "pending" if retry_at is not None else "failed"
        kept = await self.store.record_webhook_attempt(
            row["seq"],
            self.owner,
            state=state,
            status=outcome.status,
            error=outcome.error,
            next_attempt_at=retry_at,
            now=int(now),
        )
        log.log(
            logging.INFO if outcome.ok else logging.WARNING,
            "webhook %s %s to %s: %s (attempt %d)%s",
            row["event_type"],
            row["event_id"],
            where(row["url"]),
            "delivered" if outcome.ok else outcome.error,
            row["attempts"],
            "" if state != "failed" else ", giving up",
            extra={"batch_id": row["batch_id"], "action": "webhook"},
        )
        if not kept:
            log.warning("lost the lease of webhook delivery %s", row["seq"], extra={"action": "webhook"})

    async def aclose(self) -> None:
        for task in list(self.inflight):
            task.cancel()
        await asyncio.gather(*self.inflight, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None
