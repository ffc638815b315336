"""Per-project quotas, checked when a file is uploaded or a batch is created."""

from __future__ import annotations

from batchd.api.admin import effective_quotas
from batchd.config import Settings
from batchd.errors import QuotaExceeded
from batchd.store import Store


def _exceeded(name: str, limit: int, would: int) -> QuotaExceeded:
    return QuotaExceeded(
        f"Project quota {name} exceeded: this request would bring it to {would}, the limit is {limit} "
        f"(setting BATCHD_QUOTA_{name.upper()}, or an admin's override for the project).",
        param=name,
    )


async def check_quotas(
    store: Store,
    settings: Settings,
    project: str,
    *,
    add_bytes: int = 0,
    add_batches: int = 0,
    add_lines: int = 0,
    add_tokens: int = 0,
) -> None:
    limits = effective_quotas(settings, await store.project_quota_overrides(project))
    usage = await store.project_usage(project)
    for name, used, add in (
        ("max_stored_bytes", usage["stored_bytes"], add_bytes),
        ("max_active_batches", usage["active_batches"], add_batches),
        ("max_queued_lines", usage["queued_lines"], add_lines),
        ("max_queued_tokens", usage["queued_tokens"], add_tokens),
    ):
        if add and used + add > limits[name]:
            raise _exceeded(name, limits[name], used + add)
