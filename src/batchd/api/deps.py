"""Dependency aliases, so handlers declare what they use in one word; and authentication."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Request

from batchd.blobs import BlobStore
from batchd.config import Settings
from batchd.errors import Forbidden, Unauthorized
from batchd.keys import KeyCache, Principal, is_loopback
from batchd.store import Store

DEFAULT_PROJECT = "default"


def _store(request: Request) -> Store:
    return request.app.state.store  # type: ignore[no-any-return]


def _blobs(request: Request) -> BlobStore:
    return request.app.state.blobs  # type: ignore[no-any-return]


def _settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def _wake_worker(request: Request) -> Callable[[], None]:
    """Tells this process's worker (``batchd serve``) that there is new work, so a batch is
    picked up at once instead of at the next poll; a no-op for an API without a worker."""
    worker = getattr(request.app.state, "worker", None)
    return worker.wake.set if worker is not None else _nothing


def _nothing() -> None:
    return None


def _masked(secret: str) -> str:
    return f"bd-…{secret[-4:]}" if len(secret) >= 8 else "<hidden>"


async def authenticate(request: Request) -> Principal:
    """Every ``/v1`` request: a live key's project, or the default project in open mode."""
    cached = getattr(request.state, "principal", None)
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    settings: Settings = request.app.state.settings
    cache: KeyCache = request.app.state.keys
    header = request.headers.get("authorization", "")
    scheme, _, secret = header.partition(" ")
    secret = secret.strip() if scheme.lower() == "bearer" else ""
    if await cache.live_keys() == 0:
        if settings.insecure_open or is_loopback(settings.host):
            principal = Principal(DEFAULT_PROJECT, False, None)
            request.state.principal = principal
            return principal
        raise Unauthorized(
            "This server has no API keys and is not bound to a loopback address; "
            "create one with `batchd keys create`."
        )
    if not secret:
        raise Unauthorized(
            "You didn't provide an API key. You need to provide your API key in an Authorization "
            "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
        )
    row = await cache.lookup(secret)
    if row is None:
        raise Unauthorized(f"Incorrect API key provided: {_masked(secret)}.")
    principal = Principal(row["project"], bool(row["is_admin"]), row["id"])
    request.state.principal = principal
    return principal


def _project(principal: Annotated[Principal, Depends(authenticate)]) -> str:
    """Every object belongs to the project of the key that made it."""
    return principal.project


def _admin(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
    if not principal.is_admin:
        raise Forbidden("This route needs an admin API key.")
    return principal


async def metrics_access(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
    """``/metrics``: an admin key when keys exist; anyone in open mode (loopback only)."""
    if principal.key_id is not None and not principal.is_admin:
        raise Forbidden("/metrics needs an admin API key.")
    return principal


StoreDep = Annotated[Store, Depends(_store)]
BlobsDep = Annotated[BlobStore, Depends(_blobs)]
SettingsDep = Annotated[Settings, Depends(_settings)]
ProjectDep = Annotated[str, Depends(_project)]
WakeWorkerDep = Annotated[Callable[[], None], Depends(_wake_worker)]
AdminDep = Annotated[Principal, Depends(_admin)]
