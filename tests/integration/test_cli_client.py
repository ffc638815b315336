"""The server-client commands (submit, status, list, cancel, download, files) as a user runs
them: subprocesses against a real ``batchd serve`` and FakeUpstream."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pexpect
import pytest

from batchd.testing.fake_upstream import FakeUpstreamHandle
from tests.integration.cli_support import (
    ANSI,
    PLAIN_LINE,
    assert_results,
    batchd,
    chat_lines,
    read_jsonl,
    write_input,
)
from tests.support import Server, assert_schema, free_port, request_line, wait_until

SLOW = {"batchd_upstream_concurrency": "4"}


@pytest.fixture
def backend() -> dict[str, str]:
    """These commands only speak the HTTP API, so which back end the server stores on is
    not theirs to test: SQLite only, instead of every enabled back end."""
    return {"BATCHD_TEST_BACKEND": "sqlite"}


def _json(out: subprocess.CompletedProcess[str]) -> Any:
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_submit_wait_then_every_command(server: Server, tmp_path: Path) -> None:
    lines = chat_lines(40)
    source = write_input(tmp_path / "in.jsonl", lines)
    out = batchd("submit", source, "--wait", "--metadata", "team=search", "--server", server.base_url)
    assert out.returncode == 0, out.stdout + out.stderr
    assert not ANSI.search(out.stdout), "no terminal: no escape codes"
    assert PLAIN_LINE.search(out.stdout), out.stdout
    assert re.search(r"batch_\w+ completed: 40/40 succeeded, 0 failed, in [\d.]+s", out.stdout), out.stdout
    batch_id = re.search(r"created (batch_\w+)", out.stdout)[1]  # type: ignore[index]
    output = tmp_path / "in.output.jsonl"
    assert_results(output, {x["custom_id"] for x in lines})
    assert (tmp_path / "in.errors.jsonl").read_bytes() == b""

    batch = _json(batchd("status", batch_id, "--json", "--server", server.base_url))
    assert_schema("Batch", batch)
    assert batch["status"] == "completed" and batch["request_counts"]["completed"] == 40
    assert batch["metadata"] == {"team": "search"}
    table = batchd("status", batch_id, "--server", server.base_url)
    assert table.returncode == 0 and batch_id in table.stdout and "40 succeeded" in table.stdout

    listed = _json(batchd("list", "--json", "--limit", "5", "--server", server.base_url))
    assert [b["id"] for b in listed] == [batch_id]

    files = _json(batchd("files", "list", "--json", "--server", server.base_url))
    ids = {f["id"]: f for f in files}
    assert batch["input_file_id"] in ids and batch["output_file_id"] in ids
    assert ids[batch["input_file_id"]]["filename"] == "in.jsonl"
    deleted = _json(batchd("files", "delete", batch["input_file_id"], "--json", "--server", server.base_url))
    assert deleted == {"id": batch["input_file_id"], "object": "file", "deleted": True}
    assert batch["input_file_id"] not in {f.id for f in server.client().files.list()}


def _env(server: Server) -> dict[str, str]:
    """The server through the environment instead of --server."""
    return {"BATCHD_SERVER": server.base_url}


def test_failed_lines_exit_1_and_json_output(server: Server, tmp_path: Path) -> None:
    lines = [*chat_lines(10), request_line("bad", fake_status=400)]
    source = write_input(tmp_path / "mixed.jsonl", lines)
    out_path, err_path = tmp_path / "o.jsonl", tmp_path / "e.jsonl"
    out = batchd(
        "submit", source, "--wait", "--json", "--output", out_path, "--errors", err_path, env=_env(server)
    )
    assert out.returncode == 1, out.stdout + out.stderr
    batch = json.loads(out.stdout)  # stdout is the JSON alone; messages went to stderr
    assert batch["status"] == "completed" and batch["request_counts"]["failed"] == 1
    assert "some lines failed" in out.stderr and str(err_path) in out.stderr
    assert_results(out_path, {f"req-{i}" for i in range(10)})
    assert_results(err_path, {"req-bad"}, errors=True)


def test_usage_errors_exit_2_and_no_server_exits_3(server: Server, tmp_path: Path) -> None:
    bad = write_input(tmp_path / "bad.jsonl", chat_lines(3))
    bad.write_bytes(bad.read_bytes() + b'{"custom_id": "x", "method": "GET"}\n')
    out = batchd("submit", bad, "--wait", "--server", server.base_url)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "failed validation" in out.stderr and re.search(r"line 4: \w+", out.stderr), out.stderr

    good = write_input(tmp_path / "good.jsonl", chat_lines(1))
    out = batchd("submit", good, "--metadata", "novalue", "--server", server.base_url)
    assert out.returncode == 2 and "key=value" in out.stderr
    out = batchd("status", "batch_doesnotexist", "--server", server.base_url)
    assert out.returncode == 2 and "batch_doesnotexist" in out.stderr

    nowhere = f"http://127.0.0.1:{free_port()}/v1"
    out = batchd("list", env={"BATCHD_SERVER": "", "OPENAI_BASE_URL": nowhere})
    assert out.returncode == 3, out.stderr
    assert nowhere in out.stderr and "batchd serve" in out.stderr


def test_ctrl_c_without_a_terminal_detaches_then_cancel_and_download(
    make_server: Callable[..., Server], fake_upstream: FakeUpstreamHandle, tmp_path: Path
) -> None:
    fake_upstream.configure(latency=0.5)
    server = make_server(fake_upstream.base_url, **SLOW)
    source = write_input(tmp_path / "long.jsonl", chat_lines(200))
    log = tmp_path / "submit.log"
    with log.open("w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "batchd", "submit", str(source), "--wait", "--server", server.base_url],
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**os.environ, "BATCHD_PROGRESS_INTERVAL": "0.2"},
        )
        wait_until(lambda: "in_progress" in log.read_text(), 30, what="the batch to run")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 130
    text = log.read_text()
    batch_id = re.search(r"created (batch_\w+)", text)[1]  # type: ignore[index]
    assert "detached" in text and f"batchd status {batch_id} --server {server.base_url}" in text
    assert f"batchd download {batch_id} --wait" in text
    assert server.client().batches.retrieve(batch_id).status == "in_progress"

    early = batchd("download", batch_id, "--server", server.base_url)
    assert early.returncode == 2 and "--wait" in early.stderr, early.stderr
    cancelled = _json(batchd("cancel", batch_id, "--json", "--server", server.base_url))
    assert cancelled["status"] in ("cancelling", "cancelled")

    out = batchd(
        "download", batch_id, "--wait", "-o", tmp_path / "done.jsonl", env=_env(server), cwd=tmp_path
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert re.search(rf"{batch_id} cancelled: \d+/200 succeeded", out.stdout), out.stdout
    done = read_jsonl(tmp_path / "done.jsonl")
    rest = read_jsonl(tmp_path / f"{batch_id}.errors.jsonl")
    assert len(done) + len(rest) == 200 and len(rest) > 0
    assert {e["error"]["code"] for e in rest} == {"batch_cancelled"}


def _spawn(args: list[str], server: Server) -> pexpect.spawn:
    # COLUMNS as the pty's width: an inherited COLUMNS (pytest-xdist sets 80) would win over it.
    env = {**os.environ, "TERM": "xterm", "COLUMNS": "200", "BATCHD_SERVER": server.base_url}
    return pexpect.spawn(
        sys.executable, ["-m", "batchd", *args], env=env, dimensions=(40, 200), timeout=60, encoding="utf-8"
    )


def test_live_progress_on_a_terminal(
    make_server: Callable[..., Server], fake_upstream: FakeUpstreamHandle, tmp_path: Path
) -> None:
    fake_upstream.configure(latency=0.05)
    server = make_server(fake_upstream.base_url, batchd_upstream_concurrency="16")
    source = write_input(tmp_path / "tty.jsonl", chat_lines(800))
    child = _spawn(["submit", str(source), "--wait"], server)
    child.expect(r"in_progress")
    child.expect(r"[1-9]\d*/800 done \d+ failed [1-9]\d* lines/s ETA \d+:\d\d:\d\d")
    child.expect(r"batch_\w+ completed: 800/800 succeeded, 0 failed, in [\d.]+s \([1-9]\d* lines/s\)")
    child.expect(r"output: \S+tty.output.jsonl \(800 lines\)")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert_results(tmp_path / "tty.output.jsonl", {f"req-{i}" for i in range(800)})


def test_ctrl_c_on_a_terminal_asks_and_cancels(
    make_server: Callable[..., Server], fake_upstream: FakeUpstreamHandle, tmp_path: Path
) -> None:
    fake_upstream.configure(latency=0.5)
    server = make_server(fake_upstream.base_url, **SLOW)
    source = write_input(tmp_path / "long.jsonl", chat_lines(200))
    child = _spawn(["submit", str(source), "--wait"], server)
    child.expect(r"in_progress")
    child.sendintr()
    child.expect(r"\[c\]ancel (batch_\w+) on the server, or \[d\]etach")
    batch_id = child.match[1]
    child.sendline("c")
    child.expect(f"cancelling {batch_id}")
    child.expect(rf"{batch_id} cancelled: \d+/200 succeeded")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1
    out = read_jsonl(tmp_path / "long.output.jsonl")
    err = read_jsonl(tmp_path / "long.errors.jsonl")
    assert len(out) + len(err) == 200
    assert len(err) > 0 and {e["error"]["code"] for e in err} == {"batch_cancelled"}


def test_a_file_over_64_mib_goes_through_v1_uploads(server: Server, tmp_path: Path) -> None:
    line = json.dumps(request_line("big", url="/v1/embeddings", input="x" * 65_000)).encode() + b"\n"
    source = tmp_path / "big.jsonl"
    source.write_bytes(line * (64 * 1024**2 // len(line) + 2))
    out = batchd("submit", source, "--json", "--server", server.base_url)
    assert out.returncode == 0, out.stderr
    assert "no /v1/uploads" not in out.stderr
    batch = json.loads(out.stdout)
    assert (
        server.client().files.retrieve(batch["input_file_id"]).bytes == source.stat().st_size > 64 * 1024**2
    )
