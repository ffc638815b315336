"""The ``batchd`` command line."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="batchd: an OpenAI-compatible Batch API.")


def _settings(**given: Any) -> Any:
    """Settings from the environment, overridden by the options given on the command line."""
    from pydantic import ValidationError

    from batchd.config import Settings

    try:
        return Settings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        for err in exc.errors():
            name = ".".join(str(p) for p in err["loc"])
            typer.echo(f"batchd: invalid setting {name} (BATCHD_{name.upper()}): {err['msg']}", err=True)
        raise typer.Exit(2) from exc


@app.command()
def serve(
    host: Annotated[
        str | None, typer.Option(help="Address to bind [env BATCHD_HOST; default 127.0.0.1]")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port [env BATCHD_PORT; default 8080]")] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(help="SQLite file and blobs live here [env BATCHD_DATA_DIR; default ./batchd-data]"),
    ] = None,
    upstream: Annotated[
        str | None,
        typer.Option(
            help="OpenAI-compatible base URL [env BATCHD_UPSTREAM_URL; default http://127.0.0.1:8000/v1]"
        ),
    ] = None,
    upstream_api_key: Annotated[
        str | None, typer.Option(help="Bearer key for the upstream [env BATCHD_UPSTREAM_API_KEY]")
    ] = None,
    completion_windows: Annotated[
        str | None,
        typer.Option(help="Allowed completion windows, e.g. 24h,1h,90s [env BATCHD_COMPLETION_WINDOWS]"),
    ] = None,
    upstream_concurrency: Annotated[
        int | None,
        typer.Option(help="Most requests in flight to the upstream [env BATCHD_UPSTREAM_CONCURRENCY; 64]"),
    ] = None,
    upstream_rpm: Annotated[
        int | None,
        typer.Option(help="Upstream requests/minute limit [env BATCHD_UPSTREAM_RPM; learned if unset]"),
    ] = None,
    upstream_tpm: Annotated[
        int | None,
        typer.Option(help="Upstream tokens/minute limit [env BATCHD_UPSTREAM_TPM; learned if unset]"),
    ] = None,
    request_timeout: Annotated[
        float | None, typer.Option(help="Seconds per upstream request [env BATCHD_REQUEST_TIMEOUT; 600]")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            help="batchd.toml with [[upstreams]] (several upstreams, per-model routing) [env BATCHD_CONFIG]"
        ),
    ] = None,
    no_worker: Annotated[bool, typer.Option("--no-worker", help="Serve the API only; run no worker")] = False,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
) -> None:
    """Run the HTTP API with an in-process worker (SQLite + local directory by default)."""
    from batchd.serving import run_server

    settings = _settings(
        host=host,
        port=port,
        data_dir=data_dir,
        upstream_url=upstream,
        upstream_api_key=upstream_api_key,
        completion_windows=completion_windows,
        upstream_concurrency=upstream_concurrency,
        upstream_rpm=upstream_rpm,
        upstream_tpm=upstream_tpm,
        request_timeout=request_timeout,
        config=config,
        run_worker=False if no_worker else None,
    )
    try:
        for upstream_cfg in settings.upstreams():
            upstream_cfg.resolved_key()
    except ValueError as exc:
        typer.echo(f"batchd: {exc}", err=True)
        raise typer.Exit(2) from exc
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_server(settings, log_level)


@app.command()
def migrate(
    data_dir: Annotated[Path | None, typer.Option(help="[env BATCHD_DATA_DIR]")] = None,
    database_url: Annotated[str | None, typer.Option(help="[env BATCHD_DATABASE_URL]")] = None,
) -> None:
    """Apply database migrations and exit."""
    from batchd.store.migrate import upgrade

    settings = _settings(data_dir=data_dir, database_url=database_url)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url)
    typer.echo("database is up to date")


@app.command("fake-upstream")
def fake_upstream(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    latency: Annotated[float, typer.Option(help="Seconds before each answer")] = 0.0,
    failure_rate: Annotated[float, typer.Option(help="Fraction of requests answered 500")] = 0.0,
    rpm: Annotated[int | None, typer.Option(help="Requests/minute before answering 429")] = None,
) -> None:
    """An OpenAI-compatible stand-in for a model server, for first tries and tests.
    Its answers say plainly that they are not a model's."""
    from batchd.testing.fake_upstream import run_fake_upstream

    run_fake_upstream(host=host, port=port, latency=latency, failure_rate=failure_rate, rpm=rpm)


if __name__ == "__main__":
    app()
