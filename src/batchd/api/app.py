"""The application factory: routers, error rendering, ``x-request-id``, and the lifespan that
migrates the database, opens storage and runs the in-process worker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import Depends, FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from batchd import __version__
from batchd.api import (
    admin,
    batch_extensions,
    batches,
    dashboard,
    errors,
    files,
    metrics,
    openapi,
    uploads,
    webhooks,
)
from batchd.api.deps import authenticate
from batchd.api.edge import EdgeGuard
from batchd.config import Settings
from batchd.ids import request_id
from batchd.keys import KeyCache
from batchd.runtime import open_runtime

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
    async with open_runtime(settings, with_worker=settings.run_worker) as rt:
        app.state.store, app.state.blobs = rt.store, rt.blobs
        app.state.worker = rt.worker  # the dashboard shows its lanes; None with --no-worker
        app.state.keys = KeyCache(rt.store)
        task = asyncio.create_task(rt.worker.run()) if rt.worker else None
        log.info("batchd ready", extra={"action": "start"})
        try:
            yield
        finally:
            if rt.worker and task:
                rt.worker.stop.set()
                rt.worker.wake.set()
                await task


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(
        title="batchd",
        version=__version__,
        summary="A self-hosted, OpenAI-compatible Batch API.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.add_middleware(EdgeGuard)  # inside RequestIdMiddleware: its errors carry the id too
    app.add_middleware(metrics.MetricsMiddleware)  # times EdgeGuard refusals too
    app.add_middleware(RequestIdMiddleware)
    errors.install(app)
    openapi.install(app)
    auth = [Depends(authenticate)]
    errs = openapi.error_responses()
    app.include_router(files.router, prefix="/v1", dependencies=auth, responses=errs)
    app.include_router(batches.router, prefix="/v1", dependencies=auth, responses=errs)
    app.include_router(batch_extensions.router, prefix="/v1", dependencies=auth, responses=errs)
    app.include_router(uploads.router, prefix="/v1", dependencies=auth, responses=errs)
    app.include_router(
        admin.router, prefix="/v1/admin", dependencies=auth, responses=openapi.error_responses(403)
    )
    app.include_router(dashboard.router, prefix="/v1", dependencies=auth, responses=errs)
    app.include_router(dashboard.pages)
    app.include_router(
        webhooks.router, prefix="/v1/admin", dependencies=auth, responses=openapi.error_responses(403)
    )
    app.include_router(metrics.router, responses=openapi.error_responses(403))

    @app.get("/health", tags=["ops"])
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
