"""Several upstreams for one model: split by weight, and survive losing one mid-run."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from batchd.testing import FakeUpstream
from tests.support import jsonl, read_results, request_line, wait_terminal, wait_until

pytestmark = pytest.mark.backends("sqlite")  # the back end is incidental here


def _config(tmp_path: Path, a_url: str, b_url: str) -> Path:
    path = tmp_path / "batchd.toml"
    path.write_text(
        f"""
[[upstreams]]
name = "big"
url = "{a_url}"
models = ["*"]
weight = 3
max_concurrency = 16

[[upstreams]]
name = "small"
url = "{b_url}"
api_key_env = "SMALL_KEY"
models = ["fake-model"]
weight = 1
max_concurrency = 16
"""
    )
    return path


def _run(client: Any, n: int) -> tuple[Any, list[dict[str, Any]]]:
    lines = [request_line(i) for i in range(n)]
    f = client.files.create(file=("r.jsonl", jsonl(lines)), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    return b, lines


def test_weights_split_traffic(make_server: Any, tmp_path: Path) -> None:
    with FakeUpstream.start_in_thread() as a, FakeUpstream.start_in_thread() as b:
        server = make_server(
            a.base_url, batchd_config=str(_config(tmp_path, a.base_url, b.base_url)), small_key="k"
        )
        client = server.client()
        batch, lines = _run(client, 2000)
        done = wait_terminal(client, batch.id)
        assert done.status == "completed" and done.request_counts.completed == 2000
        big, small = a.stats()["by_status"][200], b.stats()["by_status"][200]
        assert big + small == 2000
        assert abs(big / small - 3.0) <= 0.15, (big, small)  # within 5% of 3:1


def test_losing_an_upstream_mid_run_fails_no_line(make_server: Any, tmp_path: Path) -> None:
    with FakeUpstream.start_in_thread(latency=0.01) as a, FakeUpstream.start_in_thread(latency=0.01) as b:
        server = make_server(
            a.base_url, batchd_config=str(_config(tmp_path, a.base_url, b.base_url)), small_key="k"
        )
        client = server.client()
        batch, lines = _run(client, 3000)
        wait_until(
            lambda: client.batches.retrieve(batch.id).request_counts.completed >= 500, 60, what="progress"
        )
        a.stop()  # connection refused from now on
        done = wait_terminal(client, batch.id, timeout=120)
        assert done.status == "completed", done
        assert done.request_counts.completed == 3000 and done.request_counts.failed == 0
        out, err = read_results(client, done)
        assert err == []
        seen = Counter(o["custom_id"] for o in out)
        assert len(seen) == 3000 and max(seen.values()) == 1
        assert b.stats()["by_status"][200] > 3000 // 4  # the survivor took over


def test_bad_config_refuses_to_start(tmp_path: Path) -> None:
    import subprocess
    import sys

    cfg = tmp_path / "bad.toml"
    cfg.write_text('[[upstreams]]\nname = "x"\nurl = "http://x"\napi_key_env = "MISSING_VAR_FOR_TEST"\n')
    out = subprocess.run(
        [sys.executable, "-m", "batchd", "serve", "--config", str(cfg), "--port", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "MISSING_VAR_FOR_TEST" in out.stderr
