from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from batchd.testing import FakeUpstream
from batchd.testing.fake_upstream import FakeUpstreamHandle
from tests.support import Server


@pytest.fixture
def fake_upstream() -> Iterator[FakeUpstreamHandle]:
    with FakeUpstream.start_in_thread(seed=7) as handle:
        yield handle


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start ``batchd serve`` subprocesses; each is stopped at the end of the test."""
    servers: list[Server] = []

    def make(upstream_url: str, name: str = "data", **env: str) -> Server:
        server = Server(tmp_path / name, upstream_url, {k.upper(): v for k, v in env.items()})
        servers.append(server.start())
        return server

    yield make
    for s in servers:
        s.stop()


@pytest.fixture
def server(make_server: Callable[..., Server], fake_upstream: FakeUpstreamHandle) -> Server:
    return make_server(fake_upstream.base_url)
