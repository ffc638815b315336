"""A short version of bench/load.py: 50 concurrent keyed clients listing, retrieving,
uploading and downloading while a batch runs; every request must succeed (no timing asserts)."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from collections.abc import Callable

import pytest

from batchd.testing.fake_upstream import FakeUpstreamHandle
from tests.integration.test_tenancy import client, new_key_in_process, wait_auth_on
from tests.support import ROOT, Server, jsonl, request_line, wait_terminal

spec = importlib.util.spec_from_file_location("bench_load", ROOT / "bench" / "load.py")
assert spec and spec.loader
load = importlib.util.module_from_spec(spec)
sys.modules["bench_load"] = load  # dataclasses look their module up
spec.loader.exec_module(load)


pytestmark = pytest.mark.backends("sqlite")  # the back end is incidental here


def test_fifty_clients_while_a_batch_runs_see_no_errors(
    make_server: Callable[..., Server], fake_upstream: FakeUpstreamHandle
) -> None:
    server = make_server(fake_upstream.base_url)
    key = new_key_in_process(server, "load")
    wait_auth_on(server)
    c = client(server, key)
    f = c.files.create(file=("in.jsonl", jsonl([request_line(i) for i in range(2000)])), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    tally = asyncio.run(
        load.run_load(server.base_url, key, clients=50, rounds=1, file_id=f.id, batch_id=b.id, deadline=120)
    )
    assert tally.errors == [] and tally.requests == 50 * 6
    assert sum(1 for x in c.files.list(purpose="batch").data if x.filename == "small.jsonl") == 50
    assert wait_terminal(c, b.id).status == "completed"
