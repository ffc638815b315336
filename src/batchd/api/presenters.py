"""Rows to wire models: the only place that knows both shapes."""

from __future__ import annotations

from typing import Any

import orjson

from batchd import protocol as p


def file_object(row: dict[str, Any]) -> p.FileObject:
    return p.FileObject(
        id=row["id"],
        bytes=row["bytes"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        filename=row["filename"],
        purpose=row["purpose"],
    )


def batch_object(row: dict[str, Any], rate: float | None = None, eta: int | None = None) -> p.Batch:
    """The wire Batch; ``rate`` and ``eta`` are the extension fields (see ``api/progress.py``)."""
    paused_at = row.get("paused_at")
    return p.Batch(
        id=row["id"],
        endpoint=row["endpoint"],
        model=row["model"],
        errors=p.BatchErrors.model_validate(orjson.loads(row["errors"])) if row["errors"] else None,
        input_file_id=row["input_file_id"],
        completion_window=row["completion_window"],
        status=row["status"],
        output_file_id=row["output_file_id"],
        error_file_id=row["error_file_id"],
        created_at=row["created_at"],
        in_progress_at=row["in_progress_at"],
        expires_at=row["expires_at"],
        finalizing_at=row["finalizing_at"],
        completed_at=row["completed_at"],
        failed_at=row["failed_at"],
        expired_at=row["expired_at"],
        cancelling_at=row["cancelling_at"],
        cancelled_at=row["cancelled_at"],
        request_counts=p.RequestCounts(total=row["total"], completed=row["completed"], failed=row["failed"]),
        usage=p.BatchUsage(
            input_tokens=row["input_tokens"],
            input_tokens_details=p.InputTokensDetails(cached_tokens=row["cached_tokens"]),
            output_tokens=row["output_tokens"],
            output_tokens_details=p.OutputTokensDetails(reasoning_tokens=row["reasoning_tokens"]),
            total_tokens=row["total_tokens"],
        ),
        metadata=orjson.loads(row["metadata"]) if row["metadata"] else None,
        paused=paused_at is not None and row["status"] in ("validating", "in_progress"),
        paused_at=paused_at,
        lines_per_second=rate,
        eta=eta,
    )
