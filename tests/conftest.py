from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from batchd.testing import FakeUpstream
from batchd.testing.fake_upstream import FakeUpstreamHandle
from tests import backends
from tests.support import Server


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``@pytest.mark.backends("sqlite")``: a test whose back end is incidental (the HTTP edge,
    engine logic, presentation) runs on that one only; each store and blob path it touches is
    covered on PostgreSQL + S3 by other tests. Deselected, not skipped: nothing is missing."""
    keep, drop = [], []
    for item in items:
        marker = item.get_closest_marker("backends")
        param = getattr(item, "callspec", None) and item.callspec.params.get("backend")  # type: ignore[attr-defined]
        (drop if marker and param and param not in marker.args else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture
def fake_upstream() -> Iterator[FakeUpstreamHandle]:
    with FakeUpstream.start_in_thread(seed=7) as handle:
        yield handle


@pytest.fixture(scope="session")
def s3_session() -> Iterator[backends.S3Server | None]:
    """One moto_server for the session, started only when the pg back end is enabled."""
    if "pg" not in backends.enabled():
        yield None
        return
    with backends.s3_server() as s3:
        yield s3


@pytest.fixture(params=backends.enabled())
def backend(request: pytest.FixtureRequest, s3_session: backends.S3Server | None) -> Iterator[dict[str, str]]:
    """Environment that points a server at this test's back end: ``sqlite`` (a SQLite file and
    a local directory, the defaults) or ``pg`` (a fresh PostgreSQL database and an S3 prefix)."""
    if request.param == "sqlite":
        yield {"BATCHD_TEST_BACKEND": "sqlite"}
        return
    assert s3_session is not None
    with ExitStack() as stack:
        db = stack.enter_context(backends.pg_database())
        yield {
            "BATCHD_TEST_BACKEND": "pg",
            "BATCHD_DATABASE_URL": db,
            "BATCHD_STORAGE_URL": s3_session.url(),
            **s3_session.env,
        }


@pytest.fixture
def make_server(tmp_path: Path, backend: dict[str, str]) -> Iterator[Callable[..., Server]]:
    """Start ``batchd serve`` subprocesses on this test's back end; all stopped at the end.
    Servers started with the same ``name`` share a data directory (a restart)."""
    servers: list[Server] = []

    def make(upstream_url: str, name: str = "data", command: str = "serve", **env: str) -> Server:
        env = {**backend, **{k.upper(): v for k, v in env.items()}}
        server = Server(tmp_path / name, upstream_url, env, command=command)
        servers.append(server.start())
        return server

    yield make
    for s in servers:
        s.stop()


@pytest.fixture
def server(make_server: Callable[..., Server], fake_upstream: FakeUpstreamHandle) -> Server:
    return make_server(fake_upstream.base_url)
