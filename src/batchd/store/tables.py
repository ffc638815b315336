"""The one MetaData: every table batchd keeps, for SQLite and PostgreSQL alike.

Each row with a public id also has an integer ``seq``: list pages are ordered and cut by it,
so ``after=<id>`` cursors stay stable when many rows share a ``created_at`` second.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

# SQLite only autoincrements INTEGER PRIMARY KEY; PostgreSQL wants BIGINT for large tables.
SeqType = BigInteger().with_variant(Integer(), "sqlite")

files = Table(
    "files",
    metadata,
    Column("seq", SeqType, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("project", String(128), nullable=False),
    Column("filename", Text, nullable=False),
    Column("purpose", String(32), nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger),
    # Uploaded files own one blob; result files are views over a batch's result parts.
    Column("blob_key", Text),
    Column("sha256", String(64)),
    Column("batch_id", String(64)),
    Column("stream", String(8)),
    Column("deleted_at", BigInteger),
    # Uploads only, for quotas: physical lines, and an estimate of their tokens (bytes / 4).
    Column("line_count", BigInteger),
    Column("est_tokens", BigInteger),
)
Index("ix_files_project_seq", files.c.project, files.c.seq)

batches = Table(
    "batches",
    metadata,
    Column("seq", SeqType, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("project", String(128), nullable=False),
    Column("endpoint", String(64), nullable=False),
    Column("model", Text),
    Column("input_file_id", String(64), nullable=False),
    Column("completion_window", String(32), nullable=False),
    Column("status", String(16), nullable=False),
    Column("output_file_id", String(64)),
    Column("error_file_id", String(64)),
    Column("errors", Text),
    Column("metadata", Text),
    Column("output_expires_seconds", BigInteger),
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    Column("in_progress_at", BigInteger),
    Column("finalizing_at", BigInteger),
    Column("completed_at", BigInteger),
    Column("failed_at", BigInteger),
    Column("expired_at", BigInteger),
    Column("cancelling_at", BigInteger),
    Column("cancelled_at", BigInteger),
    Column("total", BigInteger, nullable=False, default=0),
    Column("completed", BigInteger, nullable=False, default=0),
    Column("failed", BigInteger, nullable=False, default=0),
    Column("input_tokens", BigInteger, nullable=False, default=0),
    Column("cached_tokens", BigInteger, nullable=False, default=0),
    Column("output_tokens", BigInteger, nullable=False, default=0),
    Column("reasoning_tokens", BigInteger, nullable=False, default=0),
    Column("total_tokens", BigInteger, nullable=False, default=0),
    Column("chunk_count", Integer, nullable=False, default=0),
    # Validation and finalization are leased like chunks, so one worker does each.
    Column("job_owner", String(64)),
    Column("job_expires_at", Float),
    # Extension: where to POST this batch's terminal event (checked against the SSRF policy).
    Column("webhook_url", Text),
    # Extension: set while the batch is paused (its chunks are not leased); cleared on resume.
    Column("paused_at", BigInteger),
)
Index("ix_batches_project_seq", batches.c.project, batches.c.seq)
Index("ix_batches_status", batches.c.status)

chunks = Table(
    "chunks",
    metadata,
    Column("batch_id", String(64), primary_key=True),
    Column("idx", Integer, primary_key=True),
    Column("first_line", BigInteger, nullable=False),
    Column("line_count", Integer, nullable=False),
    Column("byte_start", BigInteger, nullable=False),
    Column("byte_end", BigInteger, nullable=False),
    # pending -> leased -> done; a leased chunk whose lease ran out is pending again.
    Column("state", String(8), nullable=False),
    Column("lease_owner", String(64)),
    Column("lease_expires_at", Float),
    Column("generation", Integer, nullable=False, default=0),
    Column("done_lines", Integer, nullable=False, default=0),
    Column("expires_at", BigInteger, nullable=False),
)
Index("ix_chunks_state_expires", chunks.c.state, chunks.c.expires_at)
# The scheduler finds each batch's first pending chunks through this (migration 0006_sched).
Index("ix_chunks_batch_state", chunks.c.batch_id, chunks.c.state, chunks.c.idx)

result_parts = Table(
    "result_parts",
    metadata,
    Column("id", SeqType, primary_key=True, autoincrement=True),
    Column("batch_id", String(64), nullable=False),
    Column("chunk_idx", Integer, nullable=False),
    Column("generation", Integer, nullable=False),
    Column("out_key", Text),
    Column("out_bytes", BigInteger, nullable=False, default=0),
    Column("out_lines", Integer, nullable=False, default=0),
    Column("err_key", Text),
    Column("err_bytes", BigInteger, nullable=False, default=0),
    Column("err_lines", Integer, nullable=False, default=0),
    # One bit per line of the chunk: which lines this part holds a result for.
    Column("done_bitmap", LargeBinary, nullable=False),
    # When the part was committed: the batch's recent lines/s is summed over a time window.
    Column("committed_at", Float),
)
Index("ix_result_parts_batch_chunk", result_parts.c.batch_id, result_parts.c.chunk_idx)
Index("ix_result_parts_batch_committed", result_parts.c.batch_id, result_parts.c.committed_at)

# API keys: only the sha256 of the secret is kept; ``prefix`` is what lists show.
api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("project", String(128), nullable=False),
    Column("name", Text),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("prefix", String(32), nullable=False),
    Column("is_admin", Boolean, nullable=False, default=False),
    Column("created_at", BigInteger, nullable=False),
    Column("revoked_at", BigInteger),
)

# Projects exist implicitly (a key names one); a row holds an admin's quota overrides,
# each NULL meaning "the server's setting".
projects = Table(
    "projects",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("max_stored_bytes", BigInteger),
    Column("max_active_batches", BigInteger),
    Column("max_queued_lines", BigInteger),
    Column("max_queued_tokens", BigInteger),
    Column("created_at", BigInteger, nullable=False),
)

# Uploads API: an upload collects parts (each its own blob) until it is completed into a file.
uploads = Table(
    "uploads",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("project", String(128), nullable=False),
    Column("filename", Text, nullable=False),
    Column("purpose", String(32), nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("mime_type", Text, nullable=False),
    Column("file_expires_seconds", BigInteger),
    # pending -> completed | cancelled | expired
    Column("status", String(16), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    Column("file_id", String(64)),
)
Index("ix_uploads_status_expires", uploads.c.status, uploads.c.expires_at)

upload_parts = Table(
    "upload_parts",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("upload_id", String(64), nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("blob_key", Text, nullable=False),
    Column("created_at", BigInteger, nullable=False),
)
Index("ix_upload_parts_upload", upload_parts.c.upload_id)

# Webhooks (an extension). A project's Standard Webhooks signing secret (``whsec_…``), kept in
# the clear because signing needs it; after a rotation the previous one signs too until
# ``previous_until``, so receivers can switch without losing a delivery.
webhook_secrets = Table(
    "webhook_secrets",
    metadata,
    Column("project", String(128), primary_key=True),
    Column("secret", Text, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("previous_secret", Text),
    Column("previous_until", BigInteger),
)

# Endpoints an admin set for a project: every terminal event of the project's batches.
webhook_endpoints = Table(
    "webhook_endpoints",
    metadata,
    Column("seq", SeqType, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("project", String(128), nullable=False),
    Column("url", Text, nullable=False),
    Column("description", Text),
    Column("created_at", BigInteger, nullable=False),
)
Index("ix_webhook_endpoints_project", webhook_endpoints.c.project)

# The outbox: one row per (event, destination), inserted in the transaction that ends the
# batch; leased by one worker at a time while it is being sent.
webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("seq", SeqType, primary_key=True, autoincrement=True),
    Column("event_id", String(64), nullable=False),
    Column("event_type", String(32), nullable=False),
    Column("event_created_at", BigInteger, nullable=False),
    Column("project", String(128), nullable=False),
    Column("batch_id", String(64), nullable=False),
    Column("url", Text, nullable=False),
    Column("endpoint_id", String(64)),
    # pending -> delivered | failed
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", Float, nullable=False),
    Column("lease_owner", String(64)),
    Column("lease_expires_at", Float),
    Column("last_status", Integer),
    Column("last_error", Text),
    Column("delivered_at", BigInteger),
)
Index("ix_webhook_deliveries_due", webhook_deliveries.c.state, webhook_deliveries.c.next_attempt_at)
Index("ix_webhook_deliveries_project_seq", webhook_deliveries.c.project, webhook_deliveries.c.seq)
