"""The application factory: routers, error rendering, ``x-request-id``, and the lifespan that
migrates the database, opens storage and runs the in-process worker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from batchd import __version__
from batchd.api import batches, errors, files
from batchd.blobs import BlobStore
from batchd.config import Settings
from batchd.engine.identity import WorkerIdentity
from batchd.engine.journal import JournalDir
from batchd.engine.lanes import build_router
from batchd.engine.worker import Worker
from batchd.ids import request_id
from batchd.store import Store
from batchd.store.migrate import upgrade

log = logging.getLogger(__name__)


class RequestIdMiddleware:
    """Give every response an ``x-request-id`` (the SDK reads it into ``_request_id``)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id()
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"x-request-id" for k, _ in headers):
                    headers.append((b"x-request-id", rid.encode()))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_id)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    await asyncio.to_thread(upgrade, settings.resolved_database_url)
    store = Store.open(settings.resolved_database_url)
    blobs = BlobStore.from_url(settings.storage_url, settings.blob_dir)
    router = build_router(settings)
    app.state.store, app.state.blobs = store, blobs
    worker = None
    if settings.run_worker:
        identity = WorkerIdentity.claim(settings.data_dir)
        journals = JournalDir(settings.data_dir / "journal" / identity.owner)
        worker = Worker(settings, store, blobs, router, identity=identity, journals=journals)
    task = asyncio.create_task(worker.run()) if worker else None
    log.info("batchd ready", extra={"action": "start"})
    try:
        yield
    finally:
        if worker and task:
            worker.stop.set()
            worker.wake.set()
            await task
            worker.identity.release()
        await router.aclose()
        await store.close()


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(
        title="batchd",
        version=__version__,
        summary="A self-hosted, OpenAI-compatible Batch API.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.add_middleware(RequestIdMiddleware)
    errors.install(app)
    app.include_router(files.router, prefix="/v1")
    app.include_router(batches.router, prefix="/v1")

    @app.get("/health", tags=["ops"])
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
