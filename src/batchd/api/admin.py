"""``/v1/admin``: API keys and per-project quota overrides, for admin keys only."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from batchd.api.deps import AdminDep, SettingsDep, StoreDep
from batchd.config import Settings
from batchd.errors import NotFound
from batchd.keys import create_key
from batchd.store.store import QUOTA_COLUMNS

router = APIRouter(tags=["admin"])


class CreateKeyRequest(BaseModel):
    project: str = Field(min_length=1, max_length=128)
    name: str | None = Field(None, max_length=200)
    is_admin: bool = False


INT64_MAX = 2**63 - 1  # the database's BIGINT: larger values would fail in the driver


class QuotaUpdate(BaseModel):
    max_stored_bytes: int | None = Field(None, ge=0, le=INT64_MAX)
    max_active_batches: int | None = Field(None, ge=0, le=INT64_MAX)
    max_queued_lines: int | None = Field(None, ge=0, le=INT64_MAX)
    max_queued_tokens: int | None = Field(None, ge=0, le=INT64_MAX)


def key_object(row: dict[str, Any], secret: str | None = None) -> dict[str, Any]:
    out = {
        "id": row["id"],
        "object": "api_key",
        "project": row["project"],
        "name": row["name"],
        "prefix": row["prefix"],
        "is_admin": bool(row["is_admin"]),
        "created_at": row["created_at"],
        "revoked_at": row["revoked_at"],
    }
    if secret is not None:
        out["key"] = secret
    return out


def effective_quotas(settings: Settings, overrides: dict[str, Any]) -> dict[str, int]:
    return {
        c: v if (v := overrides.get(c)) is not None else getattr(settings, f"quota_{c}")
        for c in QUOTA_COLUMNS
    }


@router.post("/keys")
async def create_api_key(req: CreateKeyRequest, store: StoreDep, _: AdminDep) -> dict[str, Any]:
    secret, row = await create_key(store, req.project, admin=req.is_admin, name=req.name)
    return key_object(row, secret)


@router.get("/keys")
async def list_api_keys(store: StoreDep, _: AdminDep) -> dict[str, Any]:
    return {"object": "list", "data": [key_object(r) for r in await store.list_api_keys()]}


@router.delete("/keys/{key_id}")
async def revoke_api_key(key_id: str, store: StoreDep, _: AdminDep) -> dict[str, Any]:
    row = await store.revoke_api_key(key_id, int(time.time()))
    if row is None:
        raise NotFound(f"No such API key: {key_id}", param="key_id", code="key_not_found")
    return key_object(row)


@router.get("/projects/{name}/quotas")
async def get_quotas(name: str, store: StoreDep, settings: SettingsDep, _: AdminDep) -> dict[str, Any]:
    overrides = await store.project_quota_overrides(name)
    usage = await store.project_usage(name)
    return {
        "project": name,
        "overrides": overrides,
        "effective": effective_quotas(settings, overrides),
        "usage": usage,
    }


@router.post("/projects/{name}/quotas")
async def set_quotas(
    name: str, req: QuotaUpdate, store: StoreDep, settings: SettingsDep, _: AdminDep
) -> dict[str, Any]:
    overrides = await store.set_project_quotas(name, req.model_dump(exclude_unset=True), int(time.time()))
    return {"project": name, "overrides": overrides, "effective": effective_quotas(settings, overrides)}
