"""The OpenAI wire contract for Files and Batches, in one place.

Wire models only, fields in OpenAI's documented order; every key is always sent (``null``
where unset) because the real API does and clients compare against it. Our extensions are
fenced below and named as such. This module imports neither the store nor the engine.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

BATCH_ENDPOINTS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/moderations",
)
UPLOAD_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
BatchStatus = Literal[
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
]
TERMINAL_STATUSES = frozenset({"failed", "completed", "expired", "cancelled"})
BATCH_INPUT_TTL = 30 * 86400
OUTPUT_TTL = 30 * 86400
MIN_EXPIRES_AFTER, MAX_EXPIRES_AFTER = 3600, 2_592_000


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorBody


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    expires_at: int | None
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    status_details: str | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class BatchErrorItem(BaseModel):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchErrorItem]


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class InputTokensDetails(BaseModel):
    cached_tokens: int


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int


class BatchUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class Batch(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    model: str | None
    errors: BatchErrors | None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: RequestCounts
    usage: BatchUsage | None
    metadata: dict[str, str] | None
    # --- batchd extensions, beyond OpenAI's Batch object (docs/api.md, "Extensions") ---
    paused: bool = False
    paused_at: int | None = None
    lines_per_second: float | None = None
    eta: int | None = None


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Batch]
    first_id: str | None
    last_id: str | None
    has_more: bool


class RerunRequest(BaseModel):
    """Extension: ``POST /v1/batches/{id}/rerun``; every field defaults to the original's."""

    completion_window: str | None = None
    metadata: dict[str, str] | None = None


class ExpiresAfter(BaseModel):
    anchor: Literal["created_at"]
    seconds: int = Field(ge=MIN_EXPIRES_AFTER, le=MAX_EXPIRES_AFTER)


class CreateBatchRequest(BaseModel):
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None
    output_expires_after: ExpiresAfter | None = None
    # Extension (as Inference.net accepts it): POST the batch's terminal event here.
    webhook_url: str | None = None


# Output lines (one per request) are built on the hot path with orjson from plain dicts of
# this shape: {"id", "custom_id", "response": {"status_code", "request_id", "body"} | null,
# "error": {"code", "message"} | null}. Codes we write in ``error``:
LINE_ERROR_MESSAGES = {
    "batch_expired": "This request could not be executed before the completion window expired.",
    "batch_cancelled": "This request was not executed because the batch was cancelled.",
    "request_timeout": "The upstream did not answer this request in time, after all retries.",
    # batchd extension: the upstream could not be reached at all, after all retries.
    "upstream_unreachable": "The upstream could not be reached for this request, after all retries.",
}


# ------------------------------------------------------------------------------- uploads

UPLOAD_TTL = 3600
MAX_PART_BYTES = 64 * 1024**2


class Upload(BaseModel):
    id: str
    object: Literal["upload"] = "upload"
    bytes: int
    created_at: int
    expires_at: int
    filename: str
    purpose: str
    status: Literal["pending", "completed", "cancelled", "expired"]
    file: FileObject | None = None


class UploadPart(BaseModel):
    id: str
    object: Literal["upload.part"] = "upload.part"
    created_at: int
    upload_id: str


class CreateUploadRequest(BaseModel):
    filename: str
    purpose: str
    bytes: int = Field(ge=0)
    mime_type: str
    expires_after: ExpiresAfter | None = None


class CompleteUploadRequest(BaseModel):
    part_ids: list[str]
    md5: str | None = None
