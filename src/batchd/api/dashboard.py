"""The dashboard: a static page (HTML, CSS, vanilla JS, committed under ``api/static``) and the
JSON it polls.

The page itself holds no data, so it is public: a browser cannot send a Bearer header when it
navigates. Its script asks for a key (kept in ``sessionStorage``) and sends it as
``Authorization: Bearer`` on every fetch to ``/v1/dashboard/*``, which sit behind the same
authentication as the rest of ``/v1``. A key never travels in a URL.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import RedirectResponse

from batchd import protocol as p
from batchd.api.batches import cancel_batch, not_found
from batchd.api.dashboard_state import ErrorCodeCounter, build_state
from batchd.api.deps import BlobsDep, StoreDep, authenticate
from batchd.errors import NotFound
from batchd.keys import KeyCache, Principal, is_loopback

PrincipalDep = Annotated[Principal, Depends(authenticate)]

# Only these names are served, so no path from a request ever reaches the file system.
ASSETS = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cache-control": "no-cache",
}

pages = APIRouter(include_in_schema=False)
router = APIRouter(tags=["dashboard"])


@cache
def _asset(name: str) -> bytes:
    return (resources.files("batchd.api") / "static" / name).read_bytes()


@pages.get("/")
async def root() -> RedirectResponse:
    return RedirectResponse("/dashboard", status_code=307)


@pages.get("/dashboard")
async def page() -> Response:
    return Response(_asset("dashboard.html"), media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


@pages.get("/dashboard/static/{name}")
async def asset(name: str) -> Response:
    if name not in ASSETS:
        raise NotFound(f"No such dashboard asset: {name[:100]}", param="name", code="not_found")
    return Response(_asset(name), media_type=ASSETS[name], headers=PAGE_HEADERS)


@pages.get("/dashboard/auth-mode")
async def auth_mode(request: Request) -> dict[str, str]:
    """Whether the page must ask for a key before its first call: ``open`` (no keys, loopback
    or ``--insecure-open``), ``key``, or ``locked`` (no keys and a public address: nothing
    works until an operator creates one). Every ``/v1`` answer already tells as much."""
    settings = request.app.state.settings
    cache_: KeyCache = request.app.state.keys
    if await cache_.live_keys():
        return {"mode": "key"}
    return {"mode": "open" if settings.insecure_open or is_loopback(settings.host) else "locked"}


def _counter(request: Request) -> ErrorCodeCounter:
    counter = getattr(request.app.state, "error_codes", None)
    if counter is None:
        counter = request.app.state.error_codes = ErrorCodeCounter()
    return counter


@router.get("/dashboard/state")
async def state(
    request: Request,
    response: Response,
    store: StoreDep,
    blobs: BlobsDep,
    principal: PrincipalDep,
    recent: Annotated[int, Query(ge=0, le=200)] = 30,
) -> dict[str, Any]:
    """Batches (all active ones and the ``recent`` newest others), error codes and lanes."""
    response.headers["cache-control"] = "no-store"
    worker = getattr(request.app.state, "worker", None)
    return await build_state(store, blobs, _counter(request), principal, worker, recent)


@router.post("/dashboard/batches/{batch_id}/cancel", response_model=p.Batch)
async def cancel_any(batch_id: str, store: StoreDep, principal: PrincipalDep) -> p.Batch:
    """Cancel from the dashboard: like ``POST /v1/batches/{id}/cancel``, except that an admin
    key may cancel a batch of any project (the dashboard shows an admin every project)."""
    project = principal.project
    if principal.is_admin:
        row = await store.get_batch(batch_id)
        if row is None:
            raise not_found(batch_id)
        project = row["project"]
    return await cancel_batch(batch_id, store, project)
