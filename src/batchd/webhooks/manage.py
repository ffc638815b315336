"""What an admin does with webhooks, shared by ``/v1/admin`` and ``batchd webhooks``."""

from __future__ import annotations

import secrets
import time
from typing import Any

from batchd.store import Store
from batchd.webhooks.policy import AddressPolicy
from batchd.webhooks.signing import new_secret


def endpoint_id() -> str:
    return "we_" + secrets.token_hex(12)


def endpoint_object(row: dict[str, Any], secret: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": row["id"],
        "object": "webhook_endpoint",
        "project": row["project"],
        "url": row["url"],
        "description": row.get("description"),
        "created_at": row["created_at"],
    }
    if secret is not None:
        out["secret"] = secret
    return out


def secret_object(row: dict[str, Any], shown: bool) -> dict[str, Any]:
    return {
        "object": "webhook_secret",
        "project": row["project"],
        "created_at": row["created_at"],
        "previous_valid_until": row["previous_until"] if row["previous_secret"] else None,
        **({"secret": row["secret"]} if shown else {}),
    }


async def ensure_secret(store: Store, project: str) -> str | None:
    """Give the project a signing secret if it has none; the new secret, else None."""
    secret = new_secret()
    return secret if await store.ensure_webhook_secret(project, secret, int(time.time())) else None


async def add_endpoint(
    store: Store, policy: AddressPolicy, project: str, url: str, description: str | None = None
) -> dict[str, Any]:
    """Check the URL (``WebhookURLError``), store the endpoint, and return its object; the
    object carries the project's secret when this call created it (it is not shown again)."""
    policy.check_url(url)
    secret = await ensure_secret(store, project)
    row = await store.add_webhook_endpoint(
        id=endpoint_id(), project=project, url=url, description=description, created_at=int(time.time())
    )
    return endpoint_object(row, secret)


async def rotate_secret(store: Store, project: str, grace: float) -> dict[str, Any]:
    """A new secret for the project, returned once; the old one signs too for ``grace``."""
    row = await store.rotate_webhook_secret(project, new_secret(), int(time.time()), int(grace))
    return secret_object(row, shown=True)
