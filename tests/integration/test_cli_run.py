"""``batchd run``: a batch file straight against FakeUpstream, no server; killed and resumed."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

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
from tests.support import Server, free_port, read_results, request_line, wait_terminal, wait_until

CHAT = "/v1/chat/completions"


@pytest.fixture
def backend() -> dict[str, str]:
    """``batchd run`` keeps its state in SQLite and a directory; the one server these tests
    start is only a reference for the output format."""
    return {"BATCHD_TEST_BACKEND": "sqlite"}


def _normalized(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Output lines by custom_id, without the ids and timestamps that differ on every call."""
    out = {}
    for row in rows:
        row = {**row, "id": None}
        if row["response"]:
            body = {**row["response"]["body"], "id": None, "created": None}
            row["response"] = {**row["response"], "request_id": None, "body": body}
        out[row["custom_id"]] = row
    return out


def _chat_requests(fake_upstream: FakeUpstreamHandle) -> int:
    return int(fake_upstream.stats()["by_path"].get(CHAT, 0))


def test_run_matches_a_server_batch_and_reruns_without_sending(
    server: Server, fake_upstream: FakeUpstreamHandle, tmp_path: Path
) -> None:
    lines = [*chat_lines(60), request_line("bad", fake_status=400)]
    source = write_input(tmp_path / "in.jsonl", lines)
    out_path = tmp_path / "out.jsonl"
    args = ("run", source, "-o", out_path, "--upstream", fake_upstream.base_url, "--concurrency", "8")
    ran = batchd(*args)
    assert ran.returncode == 1, ran.stdout + ran.stderr  # one line failed
    assert not ANSI.search(ran.stdout) and PLAIN_LINE.search(ran.stdout), ran.stdout
    assert re.search(r"batch_\w+ completed: 60/61 succeeded, 1 failed, in [\d.]+s", ran.stdout), ran.stdout
    errors_path = tmp_path / "out.errors.jsonl"
    out = assert_results(out_path, {f"req-{i}" for i in range(60)})
    err = assert_results(errors_path, {"req-bad"}, errors=True)

    client = server.client()
    f = client.files.create(file=("in.jsonl", source.read_bytes()), purpose="batch")
    ref = wait_terminal(
        client, client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h").id
    )
    ref_out, ref_err = read_results(client, ref)
    assert _normalized(out) == _normalized(ref_out) and _normalized(err) == _normalized(ref_err)

    sent = _chat_requests(fake_upstream)
    before = out_path.read_bytes(), errors_path.read_bytes()
    again = batchd(*args)
    assert again.returncode == 1 and "already ended" in again.stdout, again.stdout + again.stderr
    assert (out_path.read_bytes(), errors_path.read_bytes()) == before
    assert _chat_requests(fake_upstream) == sent, "a finished run sends nothing again"

    write_input(source, chat_lines(5))
    changed = batchd(*args)
    assert changed.returncode == 2 and "not the file this run started with" in changed.stderr, changed.stderr
    assert f"delete {out_path}.batchd" in changed.stderr


def test_run_invalid_input_exit_2_and_unreachable_upstream_exit_3(
    fake_upstream: FakeUpstreamHandle, tmp_path: Path
) -> None:
    source = write_input(tmp_path / "bad.jsonl", chat_lines(3))
    source.write_bytes(source.read_bytes() + b"{not json\n")
    out_path = tmp_path / "out.jsonl"
    ran = batchd("run", source, "-o", out_path, "--upstream", fake_upstream.base_url)
    assert ran.returncode == 2, ran.stdout + ran.stderr
    assert re.search(r"line 4: \w+", ran.stderr) and "nothing was sent" in ran.stderr, ran.stderr
    assert _chat_requests(fake_upstream) == 0
    assert not Path(f"{out_path}.batchd").exists(), "a rejected file leaves no state to trip over"

    good = write_input(tmp_path / "good.jsonl", chat_lines(3))
    nowhere = f"http://127.0.0.1:{free_port()}/v1"
    ran = batchd("run", good, "-o", out_path, "--upstream", nowhere)
    assert ran.returncode == 3, ran.stdout + ran.stderr
    assert nowhere in ran.stderr and "--upstream" in ran.stderr
    assert not out_path.exists()


CONCURRENCY = 32
KILL_ENV = {"BATCHD_CHUNK_LINES": "500", "BATCHD_CHECKPOINT_INTERVAL": "0.1", "BATCHD_POLL_INTERVAL": "0.05"}


def _done(state: Path) -> int:
    """Lines the run has checkpointed, read from its state database as a user could."""
    db = state / "batchd.sqlite3"
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            row = conn.execute("select coalesce(sum(completed + failed), 0) from batches").fetchone()
    except sqlite3.OperationalError:  # created but not migrated yet
        return 0
    return int(row[0])


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "batchd", *args],
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**os.environ, **KILL_ENV},
        )


def test_run_interrupted_then_killed_then_resumed_sends_each_line_once(
    fake_upstream: FakeUpstreamHandle, tmp_path: Path
) -> None:
    n = 3000
    fake_upstream.configure(latency=0.05)
    lines = chat_lines(n)
    source = write_input(tmp_path / "big.jsonl", lines)
    out_path = tmp_path / "big.out.jsonl"
    state = Path(f"{out_path}.batchd")
    args = ["run", str(source), "-o", str(out_path), "--upstream", fake_upstream.base_url]
    args += ["--concurrency", str(CONCURRENCY)]
    log = tmp_path / "run.log"

    # Ctrl-C: requests in flight finish and are saved; exit 130 with what to do next.
    proc = _start(args, log)
    wait_until(lambda: _done(state) >= 300, 60, what="first progress")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 130, log.read_text()
    assert "Run the same command again" in log.read_text()

    # Resumed: nothing the first run sent is sent again. Then kill -9: only requests still
    # waiting for their answer may be sent again.
    interrupted_at = _done(state)
    proc = _start(args, log)
    wait_until(lambda: _done(state) >= interrupted_at + 600, 60, what="progress after resuming")
    assert fake_upstream.stats()["repeated_bodies"] == 0, "a graceful stop loses no answered line"
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert _done(state) < n, "the kill came too late to test anything"

    proc = _start(args, log)
    assert proc.wait(120) == 0, log.read_text()[-3000:]
    assert not out_path.with_name("big.out.errors.jsonl").read_bytes()
    assert_results(out_path, {x["custom_id"] for x in lines})
    stats = fake_upstream.stats()
    assert stats["repeated_bodies"] <= CONCURRENCY, stats
    assert stats["distinct_bodies"] == n and stats["by_path"][CHAT] == n + stats["repeated_bodies"], stats
    assert len(read_jsonl(out_path)) == n
