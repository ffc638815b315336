"""The commands that talk to a batchd server: submit, status, list, cancel, download, files.

They use the official ``openai`` SDK, so they work against any OpenAI-compatible Batch API,
batchd or not. Each command returns an exit code (``console.ExitCode``); failures become one
message that says what to do next, never a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, cast

import openai
from openai.types import Batch, FileObject
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn, TransferSpeedColumn
from rich.prompt import Prompt
from rich.table import Table
from rich.text import Text

from batchd.console import (
    TERMINAL,
    CliExit,
    ExitCode,
    ProgressView,
    Snapshot,
    check_input,
    detect_endpoint,
    outcome,
)

DEFAULT_SERVER = "http://127.0.0.1:8080/v1"
PLACEHOLDER_KEY = "batchd"  # a server in open mode takes any key; the SDK insists on one
CHUNKED_UPLOAD_BYTES = 64 * 1024**2  # above this, /v1/uploads (when the server has it)
POLL_SECONDS = 0.5
PIPE_WIDTH = 250

P = ParamSpec("P")


@dataclass(frozen=True)
class Connection:
    """Where the server is, resolved once: flag or ``BATCHD_*``, then ``OPENAI_*``, then default."""

    server: str
    api_key: str

    @classmethod
    def resolve(cls, server: str | None, api_key: str | None) -> Connection:
        return cls(
            server=(server or os.environ.get("OPENAI_BASE_URL") or DEFAULT_SERVER).rstrip("/"),
            api_key=api_key or os.environ.get("OPENAI_API_KEY") or PLACEHOLDER_KEY,
        )

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.server, api_key=self.api_key, max_retries=2)

    @property
    def flags(self) -> str:
        """``--server …`` for the follow-up commands we suggest, when not the default."""
        return "" if self.server == DEFAULT_SERVER else f" --server {self.server}"


def guarded(fn: Callable[P, int]) -> Callable[P, int]:
    """Turn ``CliExit`` and SDK errors into a message on stderr and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> int:
        conn = next((a for a in args if isinstance(a, Connection)), None)
        try:
            return fn(*args, **kwargs)
        except CliExit as exc:
            return _fail(exc.code, exc.message)
        except openai.APIConnectionError as exc:
            where = conn.server if conn else "the server"
            return _fail(
                ExitCode.UNREACHABLE,
                f"cannot reach the batchd server at {where} ({exc.__cause__ or exc}).\n"
                "Start it with `batchd serve`, or point at it with --server URL (env BATCHD_SERVER).",
            )
        except openai.APIStatusError as exc:
            code = ExitCode.UNREACHABLE if exc.status_code >= 500 else ExitCode.USAGE
            return _fail(code, f"the server answered {exc.status_code}: {_api_message(exc)}")
        except KeyboardInterrupt:
            return _fail(ExitCode.INTERRUPTED, "interrupted")

    return wrapper


def _fail(code: ExitCode, message: str) -> int:
    Console(stderr=True).print(f"batchd: {message}", markup=False, highlight=False, soft_wrap=True)
    return int(code)


def _api_message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return str(exc)


def _ui(json_out: bool) -> Console:
    """Human messages: stdout normally; stderr when stdout carries JSON for a script. Piped
    into grep or a file, tables get room not to wrap ids."""
    console = Console(stderr=json_out, highlight=False, soft_wrap=True)
    if not console.is_terminal:
        console.width = PIPE_WIDTH
    return console


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


def _dump(model: Any) -> Any:
    return model.model_dump(mode="json")


# ----------------------------------------------------------------------------- submit


def parse_metadata(pairs: Sequence[str]) -> dict[str, str] | None:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliExit(ExitCode.USAGE, f"--metadata takes key=value, not {pair!r}")
        out[key] = value
    return out or None


def result_paths(source: Path | str, output: Path | None, errors: Path | None) -> tuple[Path, Path]:
    """``--output``/``--errors``, else ``<stem>.output.jsonl``/``<stem>.errors.jsonl``."""
    base = Path(source)
    stem = base.name.removesuffix(".jsonl")
    return (
        output or base.with_name(f"{stem}.output.jsonl"),
        errors or base.with_name(f"{stem}.errors.jsonl"),
    )


@guarded
def submit(
    conn: Connection,
    path: Path,
    *,
    endpoint: str,
    window: str,
    metadata: Sequence[str],
    wait: bool,
    output: Path | None,
    errors: Path | None,
    json_out: bool,
) -> int:
    """Upload, create the batch; with ``wait``, follow it and download its results."""
    check_input(path)
    meta = parse_metadata(metadata)
    ep = detect_endpoint(path) if endpoint == "auto" else endpoint
    ui = _ui(json_out)
    client = conn.client()
    uploaded = upload(client, path, ui)
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint=cast(Any, ep),
        completion_window=cast(Any, window),
        metadata=meta if meta is not None else openai.omit,
    )
    ui.print(f"created {batch.id} ({ep}, window {window})", markup=False)
    if not wait:
        ui.print(
            f"follow it:     batchd status {batch.id}{conn.flags}\n"
            f"get results:   batchd download {batch.id} --wait{conn.flags}",
            markup=False,
        )
        if json_out:
            _print_json(_dump(batch))
        return int(ExitCode.OK)
    out, err = result_paths(path, output, errors)
    return follow_and_download(conn, client, batch.id, out, err, ui, json_out)


class _CountingReader(io.FileIO):
    """A file that reports how far the SDK has read it, for the upload bar."""

    def __init__(self, path: Path, on_read: Callable[[int], None]):
        super().__init__(path, "rb")
        self._on_read = on_read

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self._on_read(self.tell())
        return data or b""


def upload(client: openai.OpenAI, path: Path, ui: Console) -> FileObject:
    """One ``files.create`` for small files; ``/v1/uploads`` in 64 MiB parts for big ones
    (falls back to one request, and says so, when the server has no ``/v1/uploads``)."""
    size = path.stat().st_size
    if size > CHUNKED_UPLOAD_BYTES:
        chunked = _upload_chunked(client, path, size, ui)
        if chunked is not None:
            return chunked
        ui.print("the server has no /v1/uploads; sending the file in one request instead")
    with _bar(ui, "uploading", size, transfer=True) as advance:
        with _CountingReader(path, advance) as reader:
            uploaded = client.files.create(file=(path.name, reader), purpose="batch")
    ui.print(f"uploaded {path} as {uploaded.id} ({size:,} bytes)", markup=False)
    return uploaded


def _upload_chunked(client: openai.OpenAI, path: Path, size: int, ui: Console) -> FileObject | None:
    """None when the server has no ``/v1/uploads`` (404/405 on the first call)."""
    try:
        with _bar(ui, "uploading in parts", None, transfer=False):
            done = client.uploads.upload_file_chunked(
                file=path, mime_type="application/jsonl", purpose="batch", bytes=size
            )
    except (openai.NotFoundError, openai.APIStatusError) as exc:
        if isinstance(exc, openai.NotFoundError) or exc.status_code == 405:
            return None
        raise
    if done.file is None:
        raise CliExit(ExitCode.UNREACHABLE, f"the upload {done.id} completed without a file")
    return done.file


@contextlib.contextmanager
def _bar(ui: Console, label: str, total: int | None, *, transfer: bool) -> Iterator[Callable[[int], None]]:
    """A transfer bar on a terminal; elsewhere nothing (the caller prints one line after)."""
    if not ui.is_terminal:
        yield lambda _n: None
        return
    columns: list[Any] = [SpinnerColumn(), TextColumn(label)]
    if transfer:
        columns += [BarColumn(), DownloadColumn(), TransferSpeedColumn()]
    with Progress(*columns, console=ui, transient=True) as progress:
        task = progress.add_task(label, total=total)
        yield lambda n: progress.update(task, completed=n)


# ----------------------------------------------------------------------------- waiting


def snapshot(batch: Batch) -> Snapshot:
    counts = batch.request_counts
    return Snapshot(
        batch_id=batch.id,
        status=batch.status,
        completed=counts.completed if counts else 0,
        failed=counts.failed if counts else 0,
        total=counts.total if counts else 0,
    )


def follow(client: openai.OpenAI, batch_id: str, ui: Console) -> Batch:
    """Poll until the batch is terminal, showing progress; ends with the summary line."""
    with ProgressView(ui) as view:
        while True:
            batch = client.batches.retrieve(batch_id)
            if batch.status in TERMINAL:
                view.finish(snapshot(batch))
                return batch
            view.update(snapshot(batch))
            time.sleep(POLL_SECONDS)


def follow_and_download(
    conn: Connection,
    client: openai.OpenAI,
    batch_id: str,
    out: Path,
    err: Path,
    ui: Console,
    json_out: bool,
) -> int:
    try:
        batch = follow(client, batch_id, ui)
    except KeyboardInterrupt:
        batch_or_none = _interrupted(conn, client, batch_id, out, err, ui)
        if batch_or_none is None:
            return int(ExitCode.INTERRUPTED)
        batch = batch_or_none
    return finish(client, batch, out, err, ui, json_out)


def _interrupted(
    conn: Connection, client: openai.OpenAI, batch_id: str, out: Path, err: Path, ui: Console
) -> Batch | None:
    """Ctrl-C while waiting: on a terminal, ask whether to cancel or detach; elsewhere
    detach. Returns the cancelled batch, or None when detached."""
    choice = "d"
    if sys.stdin.isatty() and ui.is_terminal:
        with contextlib.suppress(KeyboardInterrupt, EOFError):
            choice = Prompt.ask(
                Text(f"\n[c]ancel {batch_id} on the server, or [d]etach and leave it running?"),
                choices=["c", "d"],
                default="d",
                console=ui,
            )
    if choice == "c":
        client.batches.cancel(batch_id)
        ui.print(f"cancelling {batch_id}; waiting for it to stop (Ctrl-C again detaches)", markup=False)
        with contextlib.suppress(KeyboardInterrupt):
            return follow(client, batch_id, ui)
    ui.print(
        f"\ndetached; {batch_id} keeps running on the server.\n"
        f"check it:     batchd status {batch_id}{conn.flags}\n"
        f"resume:       batchd download {batch_id} --wait --output {out} --errors {err}{conn.flags}",
        markup=False,
        soft_wrap=True,
    )
    return None


def finish(client: openai.OpenAI, batch: Batch, out: Path, err: Path, ui: Console, json_out: bool) -> int:
    """Download a terminal batch's results and say what happened; the exit code follows."""
    if batch.status == "failed":
        _print_batch_errors(batch)
        return int(ExitCode.USAGE)
    out_lines = fetch(client, batch.output_file_id, out)
    err_lines = fetch(client, batch.error_file_id, err)
    ui.print(f"output: {out} ({out_lines} lines)\nerrors: {err} ({err_lines} lines)", markup=False)
    failed = batch.request_counts.failed if batch.request_counts else 0
    if batch.status in ("expired", "cancelled"):
        ui.print(
            f"the batch was {batch.status}; lines it did not finish are in {err} "
            f"(batch_{batch.status}); submit them again if you still need them",
            markup=False,
        )
    elif failed or err_lines:
        ui.print(f"some lines failed; each one's reason is in {err}", markup=False)
    if json_out:
        _print_json(_dump(batch))
    return int(outcome(batch.status, failed or err_lines))


def _print_batch_errors(batch: Batch) -> None:
    console = Console(stderr=True, highlight=False)
    console.print(f"batchd: {batch.id} failed validation; nothing was sent:", markup=False)
    for e in batch.errors.data if batch.errors and batch.errors.data else []:
        where = f"line {e.line}: " if e.line is not None else ""
        console.print(f"  {where}{e.code}: {e.message}", markup=False, soft_wrap=True)
    console.print("fix the input file and submit it again", markup=False)


def fetch(client: openai.OpenAI, file_id: str | None, path: Path) -> int:
    """Stream a result file to ``path`` (an empty file when there is none, so the files on
    disk always belong to this batch); returns its line count."""
    tmp = path.with_name(path.name + ".part")
    lines = 0
    with tmp.open("wb") as f:
        if file_id:
            with client.files.with_streaming_response.content(file_id) as response:
                for data in response.iter_bytes():
                    f.write(data)
                    lines += data.count(b"\n")
    os.replace(tmp, path)
    return lines


# ----------------------------------------------------------------------------- the others


@guarded
def status(conn: Connection, batch_id: str, *, json_out: bool) -> int:
    batch = conn.client().batches.retrieve(batch_id)
    if json_out:
        _print_json(_dump(batch))
    else:
        _ui(False).print(_batch_table(batch))
    return int(ExitCode.OK)


@guarded
def list_batches(conn: Connection, *, limit: int, json_out: bool) -> int:
    page = conn.client().batches.list(limit=limit)
    if json_out:
        _print_json([_dump(b) for b in page.data])
        return int(ExitCode.OK)
    table = Table("id", "status", "endpoint", "done", "failed", "total", "created")
    for b in page.data:
        s = snapshot(b)
        table.add_row(*_cells(b.id, b.status, b.endpoint, s.done, s.failed, s.total, _when(b.created_at)))
    _ui(False).print(table if page.data else "no batches yet")
    return int(ExitCode.OK)


@guarded
def cancel(conn: Connection, batch_id: str, *, json_out: bool) -> int:
    batch = conn.client().batches.cancel(batch_id)
    if json_out:
        _print_json(_dump(batch))
    else:
        _ui(False).print(
            f"{batch.id} is {batch.status}; finished lines are kept.\n"
            f"get what finished: batchd download {batch.id} --wait{conn.flags}",
            markup=False,
        )
    return int(ExitCode.OK)


@guarded
def download(
    conn: Connection, batch_id: str, *, output: Path | None, errors: Path | None, wait: bool, json_out: bool
) -> int:
    """Results of a finished batch; with ``wait``, follow it to the end first."""
    client = conn.client()
    ui = _ui(json_out)
    out, err = result_paths(batch_id, output, errors)
    if wait:
        return follow_and_download(conn, client, batch_id, out, err, ui, json_out)
    batch = client.batches.retrieve(batch_id)
    if batch.status not in TERMINAL:
        s = snapshot(batch)
        raise CliExit(
            ExitCode.USAGE,
            f"{batch_id} is {batch.status} ({s.done}/{s.total} done); it has no results yet.\n"
            f"wait for them: batchd download {batch_id} --wait{conn.flags}",
        )
    return finish(client, batch, out, err, ui, json_out)


@guarded
def files_list(conn: Connection, *, purpose: str | None, limit: int, json_out: bool) -> int:
    page = conn.client().files.list(limit=limit, purpose=purpose if purpose else openai.omit)
    if json_out:
        _print_json([_dump(f) for f in page.data])
        return int(ExitCode.OK)
    table = Table("id", "filename", "purpose", "bytes", "created", "expires")
    for f in page.data:
        expires = _when(f.expires_at) if f.expires_at else "-"
        table.add_row(*_cells(f.id, f.filename, f.purpose, f"{f.bytes:,}", _when(f.created_at), expires))
    _ui(False).print(table if page.data else "no files")
    return int(ExitCode.OK)


@guarded
def files_delete(conn: Connection, file_id: str, *, json_out: bool) -> int:
    deleted = conn.client().files.delete(file_id)
    if json_out:
        _print_json(_dump(deleted))
    else:
        _ui(False).print(f"deleted {deleted.id}", markup=False)
    return int(ExitCode.OK)


def _batch_table(batch: Batch) -> Table:
    s = snapshot(batch)
    table = Table(show_header=False, box=None)
    rows: list[tuple[str, str]] = [
        ("id", batch.id),
        ("status", batch.status),
        ("endpoint", batch.endpoint),
        ("model", batch.model or "-"),
        ("requests", f"{s.completed} succeeded, {s.failed} failed, {s.total} total"),
        ("created", _when(batch.created_at)),
        ("expires", _when(batch.expires_at) if batch.expires_at else "-"),
        ("input file", batch.input_file_id),
        ("output file", batch.output_file_id or "-"),
        ("error file", batch.error_file_id or "-"),
    ]
    if batch.usage:
        rows.append(("tokens", f"{batch.usage.input_tokens} in, {batch.usage.output_tokens} out"))
    for e in batch.errors.data if batch.errors and batch.errors.data else []:
        rows.append(
            ("error", f"line {e.line}: {e.code}: {e.message}" if e.line else f"{e.code}: {e.message}")
        )
    for key, value in rows:
        table.add_row(Text(key, style="bold"), Text(value))
    return table


def _cells(*values: object) -> list[Text]:
    """Table cells as plain text: file names and messages are data, not rich markup."""
    return [Text(str(v)) for v in values]


def _when(ts: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
