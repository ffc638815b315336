"""``GET /metrics`` (Prometheus text format) and the middleware that times API requests.

The database gauges are read at scrape time with grouped counts; everything else is this
process's counters and the live state of its in-process worker (see ``batchd.metrics``).
Access: an admin key when keys exist; open in open mode (no keys, loopback only).
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from batchd.api.deps import StoreDep, metrics_access
from batchd.metrics import CONTENT_TYPE, HTTP_SECONDS, render, set_db_state

router = APIRouter(tags=["ops"])


@router.get(
    "/metrics",
    dependencies=[Depends(metrics_access)],
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}},
)
async def metrics(store: StoreDep) -> Response:
    set_db_state(await store.metrics_snapshot(time.time()))
    return Response(render(with_db=True), media_type=CONTENT_TYPE)


class MetricsMiddleware:
    """Observe every HTTP request's duration, labelled by the route *template* that served it
    (``/v1/batches/{batch_id}``), never the raw path: ids would make a series per object."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            HTTP_SECONDS.labels(scope["method"], route_template(scope), str(status)).observe(
                time.perf_counter() - started
            )


def route_template(scope: Scope) -> str:
    """``/v1/batches/{batch_id}/results`` for ``/v1/batches/batch_12…/results``: the path with
    each segment that is a path parameter's value put back as ``{name}``. (A route's own
    ``path`` lacks its router's prefix in some FastAPI versions; the parameters are always
    in the scope.) Requests that matched no route share one label."""
    if scope.get("route") is None and "endpoint" not in scope:
        return "<unmatched>"
    params = {str(v): k for k, v in (scope.get("path_params") or {}).items()}
    path: str = scope.get("path", "")
    if not params:
        return path
    return "/".join(f"{{{params[seg]}}}" if seg in params else seg for seg in path.split("/"))
