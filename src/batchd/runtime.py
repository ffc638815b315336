"""What every batchd process opens: the migrated store, the blob store, and (for processes
that work) a worker with its identity, journals and upstream router. The API lifespan,
``batchd worker`` and ``batchd run`` all start from here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass

from batchd.blobs import BlobStore
from batchd.config import Settings
from batchd.engine.identity import WorkerIdentity
from batchd.engine.journal import JournalDir
from batchd.engine.lanes import build_router
from batchd.engine.worker import Worker
from batchd.metrics import serve_metrics
from batchd.store import Store
from batchd.store.migrate import upgrade

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    store: Store
    blobs: BlobStore
    worker: Worker | None


def build_worker(settings: Settings, store: Store, blobs: BlobStore) -> Worker:
    identity = WorkerIdentity.claim(settings.data_dir)
    journals = JournalDir(settings.data_dir / "journal" / identity.owner)
    return Worker(settings, store, blobs, build_router(settings), identity=identity, journals=journals)


@contextlib.asynccontextmanager
async def open_runtime(settings: Settings, *, with_worker: bool) -> AsyncIterator[Runtime]:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    await asyncio.to_thread(upgrade, settings.resolved_database_url)
    store = Store.open(settings.resolved_database_url)
    blobs = BlobStore.from_url(settings.storage_url, settings.blob_dir)
    worker = build_worker(settings, store, blobs) if with_worker else None
    try:
        yield Runtime(settings, store, blobs, worker)
    finally:
        if worker is not None:
            await worker.router.aclose()
            worker.identity.release()
        await store.close()


async def run_worker(settings: Settings) -> None:
    """``batchd worker``: lease and run work until SIGTERM/SIGINT, then drain like ``serve``
    (a second signal exits at once)."""
    async with open_runtime(settings, with_worker=True) as rt:
        assert rt.worker is not None
        worker = rt.worker
        loop = asyncio.get_running_loop()

        def on_signal(sig: int) -> None:
            if worker.stop.is_set():
                os._exit(128 + sig)
            log.info("stopping: draining in-flight requests", extra={"action": "stop"})
            worker.stop.set()
            worker.wake.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        async with contextlib.AsyncExitStack() as stack:
            if settings.metrics_port is not None:
                await stack.enter_async_context(serve_metrics(settings.metrics_host, settings.metrics_port))
                log.info("metrics on http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)
            log.info("batchd worker %s ready", worker.owner, extra={"action": "start"})
            await worker.run()
