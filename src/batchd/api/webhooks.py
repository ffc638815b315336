"""Webhooks over HTTP (an extension): the ``webhook_url`` check of batch create, and the
admin routes for a project's endpoints, signing secret and recent deliveries."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from batchd.api.deps import AdminDep, SettingsDep, StoreDep
from batchd.config import Settings
from batchd.errors import InvalidRequest, NotFound
from batchd.store import Store
from batchd.webhooks.delivery import policy_of
from batchd.webhooks.manage import add_endpoint, endpoint_object, ensure_secret, rotate_secret, secret_object
from batchd.webhooks.policy import WebhookURLError

router = APIRouter(tags=["webhooks"])


def check_webhook_url(settings: Settings, url: str) -> None:
    """400 ``invalid_value`` on ``webhook_url`` unless the SSRF policy allows it."""
    try:
        policy_of(settings).check_url(url)
    except WebhookURLError as exc:
        raise InvalidRequest(str(exc), param="webhook_url", code="invalid_value") from exc


async def prepare_project(store: Store, project: str) -> None:
    """A batch with a ``webhook_url`` is signed with its project's secret: make one now if
    the project has none (an admin reads it by rotating it; see docs/api.md)."""
    await ensure_secret(store, project)


class EndpointCreate(BaseModel):
    url: str = Field(min_length=1)
    description: str | None = Field(None, max_length=200)


def delivery_object(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": f"whd_{row['seq']}",
        "object": "webhook_delivery",
        "event_id": row["event_id"],
        "event_type": row["event_type"],
        "batch_id": row["batch_id"],
        "url": row["url"],
        "endpoint_id": row["endpoint_id"],
        "status": row["state"],
        "attempts": row["attempts"],
        "next_attempt_at": int(row["next_attempt_at"]) if row["state"] == "pending" else None,
        "last_response_status": row["last_status"],
        "last_error": row["last_error"],
        "created_at": row["event_created_at"],
        "delivered_at": row["delivered_at"],
    }


@router.post("/projects/{name}/webhooks")
async def create_endpoint(
    name: str, req: EndpointCreate, store: StoreDep, settings: SettingsDep, _: AdminDep
) -> dict[str, Any]:
    try:
        return await add_endpoint(store, policy_of(settings), name, req.url, req.description)
    except WebhookURLError as exc:
        raise InvalidRequest(str(exc), param="url", code="invalid_value") from exc


@router.get("/projects/{name}/webhooks")
async def list_endpoints(name: str, store: StoreDep, _: AdminDep) -> dict[str, Any]:
    rows = await store.list_webhook_endpoints(name)
    return {"object": "list", "data": [endpoint_object(r) for r in rows]}


@router.delete("/projects/{name}/webhooks/{endpoint_id}")
async def delete_endpoint(name: str, endpoint_id: str, store: StoreDep, _: AdminDep) -> dict[str, Any]:
    if not await store.delete_webhook_endpoint(name, endpoint_id):
        raise NotFound(
            f"No such webhook endpoint: {endpoint_id}", param="endpoint_id", code="webhook_endpoint_not_found"
        )
    return {"id": endpoint_id, "object": "webhook_endpoint", "deleted": True}


@router.get("/projects/{name}/webhook_secret")
async def get_secret(name: str, store: StoreDep, _: AdminDep) -> dict[str, Any]:
    row = await store.webhook_secret(name)
    if row is None:
        raise NotFound(
            f"Project {name} has no webhook secret yet.", param="name", code="webhook_secret_not_found"
        )
    return secret_object(row, shown=False)


@router.post("/projects/{name}/webhook_secret")
async def rotate(name: str, store: StoreDep, settings: SettingsDep, _: AdminDep) -> dict[str, Any]:
    return await rotate_secret(store, name, settings.webhook_secret_grace)


@router.get("/projects/{name}/webhook_deliveries")
async def list_deliveries(
    name: str,
    store: StoreDep,
    _: AdminDep,
    batch_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict[str, Any]:
    rows = await store.list_webhook_deliveries(name, batch_id=batch_id, limit=limit)
    return {"object": "list", "data": [delivery_object(r) for r in rows]}
