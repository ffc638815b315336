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


def _check_upstreams(settings: Any) -> None:
    """Fail before starting when the upstream table cannot be used."""
    try:
        for upstream_cfg in settings.upstreams():
            upstream_cfg.resolved_key()
    except ValueError as exc:
        typer.echo(f"batchd: {exc}", err=True)
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
    database_url: Annotated[
        str | None,
        typer.Option(
            help="postgresql://... to scale out [env BATCHD_DATABASE_URL; default SQLite in the data dir]"
        ),
    ] = None,
    storage_url: Annotated[
        str | None,
        typer.Option(
            help="s3://bucket/prefix to scale out [env BATCHD_STORAGE_URL; default <data dir>/blobs]"
        ),
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
            help="batchd.toml listing upstreams (several upstreams, per-model routing) [env BATCHD_CONFIG]"
        ),
    ] = None,
    no_worker: Annotated[bool, typer.Option("--no-worker", help="Serve the API only; run no worker")] = False,
    insecure_open: Annotated[
        bool,
        typer.Option(
            "--insecure-open",
            help="Serve with no API key on a non-loopback address [env BATCHD_INSECURE_OPEN]",
        ),
    ] = False,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
) -> None:
    """Run the HTTP API with an in-process worker (SQLite + local directory by default)."""
    from batchd.serving import run_server

    settings = _settings(
        host=host,
        port=port,
        data_dir=data_dir,
        database_url=database_url,
        storage_url=storage_url,
        upstream_url=upstream,
        upstream_api_key=upstream_api_key,
        completion_windows=completion_windows,
        upstream_concurrency=upstream_concurrency,
        upstream_rpm=upstream_rpm,
        upstream_tpm=upstream_tpm,
        request_timeout=request_timeout,
        config=config,
        run_worker=False if no_worker else None,
        insecure_open=True if insecure_open else None,
    )
    _check_upstreams(settings)
    _check_open(settings)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_server(settings, log_level)


def _check_open(settings: Any) -> None:
    """Refuse to serve with no API key on a non-loopback address unless --insecure-open."""
    from batchd.keys import is_loopback

    if settings.insecure_open or is_loopback(settings.host):
        return
    if _on_store(settings, lambda s: s.count_live_api_keys()) == 0:
        typer.echo(
            f"batchd: refusing to serve on {settings.host} with no API key defined: anyone who can "
            "reach it could use it. Create a key with `batchd keys create --project NAME --admin`, "
            "bind to 127.0.0.1, or pass --insecure-open.",
            err=True,
        )
        raise typer.Exit(2)


# ----------------------------------------------------------------------------- keys

keys_app = typer.Typer(no_args_is_help=True, help="Create, list and revoke API keys (talks to the database).")
app.add_typer(keys_app, name="keys")

DataDirOpt = Annotated[Path | None, typer.Option(help="[env BATCHD_DATA_DIR]")]
DatabaseOpt = Annotated[str | None, typer.Option(help="[env BATCHD_DATABASE_URL]")]


def _with_store(data_dir: Path | None, database_url: str | None, fn: Any) -> Any:
    return _on_store(_settings(data_dir=data_dir, database_url=database_url), fn)


def _on_store(settings: Any, fn: Any) -> Any:
    """Run ``fn(store)`` on the migrated database of ``settings``."""
    import asyncio

    from batchd.store import Store
    from batchd.store.migrate import upgrade

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url)

    async def go() -> Any:
        store = Store.open(settings.resolved_database_url)
        try:
            return await fn(store)
        finally:
            await store.close()

    return asyncio.run(go())


@keys_app.command("create")
def keys_create(
    project: Annotated[str, typer.Option(help="The project the key belongs to")],
    admin: Annotated[bool, typer.Option("--admin", help="May use /v1/admin")] = False,
    name: Annotated[str | None, typer.Option(help="A label for lists")] = None,
    data_dir: DataDirOpt = None,
    database_url: DatabaseOpt = None,
) -> None:
    """Create a key and print it once; only its hash is stored."""
    from batchd.keys import create_key

    secret, row = _with_store(
        data_dir, database_url, lambda s: create_key(s, project, admin=admin, name=name)
    )
    typer.echo(secret)
    typer.echo(
        f"id {row['id']}, project {project}{', admin' if admin else ''}: store it now, it is not shown again",
        err=True,
    )


@keys_app.command("list")
def keys_list(data_dir: DataDirOpt = None, database_url: DatabaseOpt = None) -> None:
    """List keys (never their secrets)."""
    rows = _with_store(data_dir, database_url, lambda s: s.list_api_keys())
    for r in rows:
        state = "revoked" if r["revoked_at"] else "live"
        typer.echo(
            f"{r['id']}\t{r['project']}\t{r['prefix']}…\t{'admin' if r['is_admin'] else 'member'}\t{state}"
        )


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument()], data_dir: DataDirOpt = None, database_url: DatabaseOpt = None
) -> None:
    """Revoke a key; a running server refuses it within about a second."""
    import time

    row = _with_store(data_dir, database_url, lambda s: s.revoke_api_key(key_id, int(time.time())))
    if row is None:
        typer.echo(f"batchd: no such key: {key_id}", err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked {key_id}")


# ------------------------------------------------------------------------- webhooks

webhooks_app = typer.Typer(
    no_args_is_help=True, help="A project's webhook endpoints and signing secret (talks to the database)."
)
app.add_typer(webhooks_app, name="webhooks")
ProjectOpt = Annotated[str, typer.Option(help="The project")]


@webhooks_app.command("add")
def webhooks_add(
    url: Annotated[str, typer.Argument(help="https://… that receives every batch event of the project")],
    project: ProjectOpt,
    description: Annotated[str | None, typer.Option(help="A label for lists")] = None,
    data_dir: DataDirOpt = None,
    database_url: DatabaseOpt = None,
) -> None:
    """Add an endpoint; prints the project's signing secret when this made it (shown once)."""
    from batchd.webhooks.delivery import policy_of
    from batchd.webhooks.manage import add_endpoint
    from batchd.webhooks.policy import WebhookURLError

    settings = _settings(data_dir=data_dir, database_url=database_url)
    try:
        ep = _on_store(settings, lambda s: add_endpoint(s, policy_of(settings), project, url, description))
    except WebhookURLError as exc:
        typer.echo(f"batchd: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"{ep['id']}\t{project}\t{url}")
    if "secret" in ep:
        typer.echo(ep["secret"])
        typer.echo("the project's signing secret: store it now, it is not shown again", err=True)


@webhooks_app.command("list")
def webhooks_list(project: ProjectOpt, data_dir: DataDirOpt = None, database_url: DatabaseOpt = None) -> None:
    """List the project's endpoints."""
    for r in _with_store(data_dir, database_url, lambda s: s.list_webhook_endpoints(project)):
        typer.echo(f"{r['id']}\t{r['project']}\t{r['url']}\t{r['description'] or ''}")


@webhooks_app.command("remove")
def webhooks_remove(
    endpoint_id: Annotated[str, typer.Argument()],
    project: ProjectOpt,
    data_dir: DataDirOpt = None,
    database_url: DatabaseOpt = None,
) -> None:
    """Remove an endpoint (events already queued for it are still sent)."""
    if not _with_store(data_dir, database_url, lambda s: s.delete_webhook_endpoint(project, endpoint_id)):
        typer.echo(f"batchd: no such endpoint in project {project}: {endpoint_id}", err=True)
        raise typer.Exit(1)
    typer.echo(f"removed {endpoint_id}")


@webhooks_app.command("rotate-secret")
def webhooks_rotate(
    project: ProjectOpt, data_dir: DataDirOpt = None, database_url: DatabaseOpt = None
) -> None:
    """Make the project a new signing secret and print it once; the previous one keeps
    signing too for BATCHD_WEBHOOK_SECRET_GRACE (1 day)."""
    from batchd.webhooks.manage import rotate_secret

    settings = _settings(data_dir=data_dir, database_url=database_url)
    row = _on_store(settings, lambda s: rotate_secret(s, project, settings.webhook_secret_grace))
    typer.echo(row["secret"])
    typer.echo("store it now, it is not shown again", err=True)


@app.command()
def worker(
    data_dir: Annotated[
        Path | None, typer.Option(help="Journals and worker id live here [env BATCHD_DATA_DIR]")
    ] = None,
    database_url: Annotated[str | None, typer.Option(help="[env BATCHD_DATABASE_URL]")] = None,
    storage_url: Annotated[str | None, typer.Option(help="[env BATCHD_STORAGE_URL]")] = None,
    upstream: Annotated[str | None, typer.Option(help="[env BATCHD_UPSTREAM_URL]")] = None,
    upstream_concurrency: Annotated[
        int | None, typer.Option(help="[env BATCHD_UPSTREAM_CONCURRENCY]")
    ] = None,
    upstream_rpm: Annotated[int | None, typer.Option(help="[env BATCHD_UPSTREAM_RPM]")] = None,
    upstream_tpm: Annotated[int | None, typer.Option(help="[env BATCHD_UPSTREAM_TPM]")] = None,
    config: Annotated[Path | None, typer.Option(help="batchd.toml [env BATCHD_CONFIG]")] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve Prometheus /metrics on this port [env BATCHD_METRICS_PORT]")
    ] = None,
    metrics_host: Annotated[
        str | None, typer.Option(help="Address for --metrics-port [env BATCHD_METRICS_HOST; 127.0.0.1]")
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
) -> None:
    """Run only a worker: validate, dispatch and finalize batches from the shared database
    (pair with ``serve --no-worker`` processes; any number of each, on any machines)."""
    import asyncio

    from batchd.runtime import run_worker

    settings = _settings(
        data_dir=data_dir,
        database_url=database_url,
        storage_url=storage_url,
        upstream_url=upstream,
        upstream_concurrency=upstream_concurrency,
        upstream_rpm=upstream_rpm,
        upstream_tpm=upstream_tpm,
        config=config,
        metrics_port=metrics_port,
        metrics_host=metrics_host,
    )
    _check_upstreams(settings)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(run_worker(settings))


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


# ----------------------------------------------------------------------------- client commands
# They talk to a server through the openai SDK (batchd.client_cli); ``run`` needs none.

ServerOpt = Annotated[
    str | None,
    typer.Option(
        "--server",
        envvar="BATCHD_SERVER",
        help="Base URL of the batchd server [env BATCHD_SERVER, else OPENAI_BASE_URL; "
        "default http://127.0.0.1:8080/v1]",
    ),
]
ApiKeyOpt = Annotated[
    str | None,
    typer.Option("--api-key", envvar="BATCHD_API_KEY", help="[env BATCHD_API_KEY, else OPENAI_API_KEY]"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the raw objects as JSON, for scripts")]
OutputOpt = Annotated[
    Path | None, typer.Option("--output", "-o", help="Output file [default <name>.output.jsonl]")
]
ErrorsOpt = Annotated[Path | None, typer.Option("--errors", help="Error file [default <name>.errors.jsonl]")]


def _connect(server: str | None, api_key: str | None) -> Any:
    from batchd.client_cli import Connection

    return Connection.resolve(server, api_key)


@app.command()
def submit(
    file: Annotated[Path, typer.Argument(help="The JSONL batch input file")],
    endpoint: Annotated[str, typer.Option(help="Batch endpoint; auto reads the first line's url")] = "auto",
    window: Annotated[str, typer.Option(help="Completion window")] = "24h",
    metadata: Annotated[
        list[str] | None, typer.Option(help="key=value, repeatable", show_default=False)
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the batch and download its results")] = False,
    output: OutputOpt = None,
    errors: ErrorsOpt = None,
    json_out: JsonOpt = False,
    server: ServerOpt = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """Upload a JSONL file and create a batch; with --wait, show its progress and download
    the results beside the input."""
    from batchd.client_cli import submit as submit_

    raise typer.Exit(
        submit_(
            _connect(server, api_key),
            file,
            endpoint=endpoint,
            window=window,
            metadata=metadata or [],
            wait=wait,
            output=output,
            errors=errors,
            json_out=json_out,
        )
    )


@app.command()
def status(
    batch_id: Annotated[str, typer.Argument()],
    json_out: JsonOpt = False,
    server: ServerOpt = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """Show one batch."""
    from batchd.client_cli import status as status_

    raise typer.Exit(status_(_connect(server, api_key), batch_id, json_out=json_out))


@app.command("list")
def list_batches(
    limit: Annotated[int, typer.Option(min=1, max=100, help="How many, newest first")] = 20,
    json_out: JsonOpt = False,
    server: ServerOpt = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """List batches, newest first."""
    from batchd.client_cli import list_batches as list_

    raise typer.Exit(list_(_connect(server, api_key), limit=limit, json_out=json_out))


@app.command()
def cancel(
    batch_id: Annotated[str, typer.Argument()],
    json_out: JsonOpt = False,
    server: ServerOpt = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """Cancel a batch; lines already done stay in its results."""
    from batchd.client_cli import cancel as cancel_

    raise typer.Exit(cancel_(_connect(server, api_key), batch_id, json_out=json_out))


@app.command()
def download(
    batch_id: Annotated[str, typer.Argument()],
    output: OutputOpt = None,
    errors: ErrorsOpt = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the batch to its end first")] = False,
    json_out: JsonOpt = False,
    server: ServerOpt = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """Download a finished batch's output and error files [default <batch id>.output.jsonl]."""
    from batchd.client_cli import download as download_

    conn = _connect(server, api_key)
    raise typer.Exit(download_(conn, batch_id, output=output, errors=errors, wait=wait, json_out=json_out))


files_app = typer.Typer(no_args_is_help=True, help="List or delete files on the server.")
app.add_typer(files_app, name="files")


@files_app.command("list")
def files_list(
    purpose: Annotated[str | None, typer.Option(help="Only files of this purpose")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 100,
    json_out: JsonOpt = False,
    server: ServerOpt = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """List files, newest first."""
    from batchd.client_cli import files_list as files_list_

    raise typer.Exit(files_list_(_connect(server, api_key), purpose=purpose, limit=limit, json_out=json_out))


@files_app.command("delete")
def files_delete(
    file_id: Annotated[str, typer.Argument()],
    json_out: JsonOpt = False,
    server: ServerOpt = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """Delete a file."""
    from batchd.client_cli import files_delete as files_delete_

    raise typer.Exit(files_delete_(_connect(server, api_key), file_id, json_out=json_out))


@app.command()
def run(
    file: Annotated[Path, typer.Argument(help="The JSONL batch input file")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where the output lines go")],
    upstream: Annotated[
        str | None,
        typer.Option(
            help="OpenAI-compatible base URL [env BATCHD_UPSTREAM_URL; default http://127.0.0.1:8000/v1]"
        ),
    ] = None,
    errors: ErrorsOpt = None,
    upstream_api_key: Annotated[
        str | None, typer.Option(help="Bearer key for the upstream [env BATCHD_UPSTREAM_API_KEY]")
    ] = None,
    concurrency: Annotated[
        int | None, typer.Option(help="Most requests in flight [env BATCHD_UPSTREAM_CONCURRENCY; 64]")
    ] = None,
    rpm: Annotated[
        int | None, typer.Option(help="Upstream requests/minute [env BATCHD_UPSTREAM_RPM]")
    ] = None,
    tpm: Annotated[int | None, typer.Option(help="Upstream tokens/minute [env BATCHD_UPSTREAM_TPM]")] = None,
    config: Annotated[
        Path | None, typer.Option(help="batchd.toml listing upstreams [env BATCHD_CONFIG]")
    ] = None,
) -> None:
    """Run a batch file straight against the upstream, no server needed. State lives in
    OUTPUT.batchd/: run the same command again after Ctrl-C or a crash to resume."""
    from rich.console import Console

    from batchd.run_local import RunPaths
    from batchd.run_local import run as run_

    paths = RunPaths.of(file, output, errors)
    settings = _settings(
        data_dir=paths.state,
        upstream_url=upstream,
        upstream_api_key=upstream_api_key,
        upstream_concurrency=concurrency,
        upstream_rpm=rpm,
        upstream_tpm=tpm,
        config=config,
    )
    _check_upstreams(settings)
    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    raise typer.Exit(run_(paths, settings, Console(highlight=False, soft_wrap=True)))


if __name__ == "__main__":
    app()
