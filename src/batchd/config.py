"""Settings, built once by the CLI (or a test) and passed down; nothing reads the env on import."""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from batchd.durations import parse_duration, seconds


class UpstreamConfig(BaseModel):
    """One ``[[upstreams]]`` entry of ``batchd.toml``."""

    model_config = {"extra": "forbid"}

    name: str
    url: str
    api_key: str | None = None
    api_key_env: str | None = None
    models: list[str] = Field(default_factory=lambda: ["*"])
    rpm: int | None = Field(None, gt=0)
    tpm: int | None = Field(None, gt=0)
    max_concurrency: int = Field(64, ge=1, le=10_000)
    weight: float = Field(1.0, gt=0)

    def resolved_key(self) -> str | None:
        """The key itself, or the value of the environment variable it names."""
        if self.api_key_env:
            value = os.environ.get(self.api_key_env)
            if not value:
                raise ValueError(
                    f"upstream {self.name!r}: environment variable {self.api_key_env} is not set"
                )
            return value
        return self.api_key


def load_upstreams(path: Path) -> list[UpstreamConfig]:
    """The ``[[upstreams]]`` of a TOML file, with errors that name the file and the entry."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    entries = data.get("upstreams")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected at least one [[upstreams]] table")
    try:
        upstreams = [UpstreamConfig.model_validate(e) for e in entries]
    except ValidationError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    names = [u.name for u in upstreams]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: upstream names must be unique")
    return upstreams


class Settings(BaseSettings):
    """Every knob of a batchd process; each one is also a ``BATCHD_*`` environment variable."""

    model_config = SettingsConfigDict(env_prefix="BATCHD_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = Path("./batchd-data")
    database_url: str | None = None
    storage_url: str | None = None
    upstream_url: str = "http://127.0.0.1:8000/v1"
    upstream_api_key: str | None = None
    upstream_rpm: int | None = Field(None, gt=0)
    upstream_tpm: int | None = Field(None, gt=0)
    config: Path | None = None
    completion_windows: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["24h"])

    # Dispatch.
    upstream_concurrency: int = Field(64, ge=1, le=10_000)
    request_timeout: float = Field(600.0, gt=0)
    # The HTTP client for upstream requests, chosen by measurement (docs/benchmarks.md).
    upstream_client: Literal["pyreqwest", "aiohttp"] = "pyreqwest"
    max_attempts: int = Field(8, ge=1)
    chunk_lines: int = Field(1000, ge=1)
    # Scheduling: the most chunks of one batch a worker holds at once (raised to what keeps
    # its senders busy), and of all batches together. A huge batch so leaves room for others.
    max_chunks_per_batch: int = Field(2, ge=1)
    worker_max_chunks: int = Field(16, ge=1)
    checkpoint_lines: int = Field(500, ge=1)
    checkpoint_interval: float = Field(0.5, gt=0)
    # "on": a line holds its sender until its result is in a committed part, so a worker that
    # dies leaves at most ``upstream_concurrency`` lines for another worker to send again.
    # "auto": on unless the database is SQLite (one machine, where the local journal and the
    # stable worker id already limit a restart's repeats to the requests in flight).
    durable_window: Literal["auto", "on", "off"] = "auto"
    lease_seconds: float = Field(30.0, gt=0)
    poll_interval: float = Field(0.2, gt=0)
    shutdown_grace: float = Field(30.0, ge=0)
    janitor_interval: float = Field(3600.0, gt=0)
    orphan_grace: float = Field(600.0, ge=0)

    # Input limits.
    max_file_bytes: int = Field(10 * 1024**3, ge=1)
    max_lines_per_batch: int = Field(5_000_000, ge=1)
    max_validation_errors: int = Field(100, ge=1)
    max_line_bytes: int = Field(50 * 1024**2, ge=1)
    # The HTTP edge (docs/security.md): bodies of the JSON routes are read whole, so they are
    # capped; uploads stream and have their own caps above. A body that stalls is dropped.
    max_request_bytes: int = Field(1024**2, ge=1)
    max_json_depth: int = Field(64, ge=1, le=1000)
    body_idle_timeout: float = Field(30.0, gt=0)

    # Validation: files from this size are validated in byte ranges by worker processes,
    # forked from a fork server started with the worker (prestart) so that the first big file
    # does not wait ~0.7 s for it; custom_id hashes held in memory before a sorted run is
    # written to disk (8 bytes each).
    validation_processes: int = Field(2, ge=1, le=64)
    parallel_validation_bytes: int = Field(64 * 1024**2, ge=1)
    validation_prestart: bool = True
    validation_id_memory: int = Field(500_000, ge=1)
    validation_jobs: int = Field(2, ge=1)

    # Tenancy. With no API key defined the server is open only on a loopback address.
    insecure_open: bool = False
    # Per-project quotas (an admin may override each per project; see docs/security.md).
    quota_max_stored_bytes: int = Field(100 * 1024**3, ge=0)
    quota_max_active_batches: int = Field(100, ge=0)
    quota_max_queued_lines: int = Field(50_000_000, ge=0)
    quota_max_queued_tokens: int = Field(5_000_000_000, ge=0)

    # Webhooks (an extension; see docs/api.md and docs/security.md).
    webhook_allow_http: bool = False
    # Networks (CIDRs or single addresses) that webhooks may reach although they are private,
    # loopback, link-local or otherwise not globally routable.
    webhook_allow_networks: Annotated[list[str], NoDecode] = Field(default_factory=list)
    webhook_timeout: float = Field(10.0, gt=0)
    # Seconds to wait before each retry (durations like 30s or 2m, or plain seconds); the
    # number of attempts is one more than its length. Each wait is jittered by +-20%.
    webhook_retry_schedule: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0]
    )
    webhook_max_age: float = Field(3 * 86400.0, gt=0)
    webhook_poll_interval: float = Field(1.0, gt=0)
    webhook_concurrency: int = Field(16, ge=1, le=1000)
    webhook_secret_grace: float = Field(86400.0, ge=0)

    run_worker: bool = True
    # ``batchd worker`` only: serve its own /metrics here (the API serves its in-process worker's).
    metrics_port: int | None = Field(None, ge=1, le=65535)
    metrics_host: str = "127.0.0.1"

    @field_validator("completion_windows", mode="before")
    @classmethod
    def _split_windows(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list):
            for item in value:
                parse_duration(str(item))
        return value

    @field_validator("webhook_allow_networks", mode="before")
    @classmethod
    def _split_networks(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list):
            for item in value:
                ipaddress.ip_network(str(item), strict=False)
        return value

    @field_validator("webhook_retry_schedule", mode="before")
    @classmethod
    def _split_schedule(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list):
            out = [seconds(item) for item in value]
            if any(x < 0 for x in out):
                raise ValueError("retry waits must not be negative")
            return out
        return value

    @field_validator("webhook_max_age", "webhook_secret_grace", mode="before")
    @classmethod
    def _duration(cls, value: object) -> object:
        return seconds(value) if isinstance(value, str) else value

    @field_validator("upstream_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/")

    def upstreams(self) -> list[UpstreamConfig]:
        """The upstream table: from ``--config`` when given, else the single ``--upstream``."""
        if self.config is not None:
            return load_upstreams(self.config)
        return [
            UpstreamConfig(
                name="default",
                url=self.upstream_url,
                api_key=self.upstream_api_key,
                rpm=self.upstream_rpm,
                tpm=self.upstream_tpm,
                max_concurrency=self.upstream_concurrency,
                weight=1.0,
            )
        ]

    @property
    def window_seconds(self) -> dict[str, int]:
        """Allowed ``completion_window`` strings and their length in seconds."""
        return {w: parse_duration(w) for w in self.completion_windows}

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'batchd.sqlite3').resolve()}"

    @property
    def durable_window_on(self) -> bool:
        if self.durable_window == "auto":
            return not self.resolved_database_url.startswith("sqlite")
        return self.durable_window == "on"

    @property
    def blob_dir(self) -> Path:
        return (self.data_dir / "blobs").resolve()
