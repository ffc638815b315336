"""The dashboard's HTTP side without a browser: the public page and its headers, the state
document (batches, error codes, lanes), scoping by key, the admin cancel route, and the lanes
message of an API-only server."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx2 as httpx
import pytest

from batchd.testing.fake_upstream import FakeUpstreamHandle
from tests.integration.test_tenancy import client, new_key_in_process, raw, wait_auth_on
from tests.support import Server, assert_schema, jsonl, request_line, wait_terminal

pytestmark = pytest.mark.backends("sqlite")  # the back end is incidental here


def root(server: Server) -> str:
    return server.base_url[:-3]


def state(server: Server, key: str | None = None) -> dict[str, Any]:
    r = raw(server, "GET", "/dashboard/state", key)
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    return r.json()  # type: ignore[no-any-return]


def submit(c: Any, lines: list[Any]) -> Any:
    f = c.files.create(file=("batch.jsonl", jsonl(lines)), purpose="batch")
    return c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")


def test_page_state_error_codes_and_lanes(server: Server, fake_upstream: FakeUpstreamHandle) -> None:
    # The page: public, static, nothing from the internet, strict headers.
    r = httpx.get(root(server) + "/", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/dashboard"
    page = httpx.get(root(server) + "/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "form-action 'none'" in csp and "connect-src 'self'" in csp
    assert page.headers["referrer-policy"] == "no-referrer"
    assert "<script" in page.text and "http://" not in page.text and "https://" not in page.text
    for name, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
        asset = httpx.get(f"{root(server)}/dashboard/static/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
        assert "https://" not in asset.text, f"{name} must not fetch anything from the internet"
    for bad in ("dashboard.html", "..%2Fapp.py", "nope.js"):
        miss = httpx.get(f"{root(server)}/dashboard/static/{bad}")
        assert miss.status_code == 404, bad
        assert_schema("ErrorResponse", miss.json())
    assert httpx.get(root(server) + "/dashboard/auth-mode").json() == {"mode": "open"}

    # The state: one finished batch with three upstream 400s, counted by code; the lane.
    c = server.client()
    lines = [request_line(i) for i in range(6)] + [request_line(f"bad{i}", fake_status=400) for i in range(3)]
    batch = submit(c, lines)
    wait_terminal(c, batch.id)
    s = state(server)
    assert s["principal"] == {"project": "default", "is_admin": False, "open_mode": True}
    assert s["status_counts"] == {"completed": 1}
    (b,) = s["batches"]
    assert b["id"] == batch.id and b["status"] == "completed" and b["project"] == "default"
    assert b["request_counts"] == {"total": 9, "completed": 6, "failed": 3}
    assert s["errors"]["by_code"] == {"fake_error": 3}
    assert s["errors"]["by_batch"] == [{"id": batch.id, "failed": 3, "codes": {"fake_error": 3}}]
    assert s["errors"]["partial"] is False
    lanes = s["lanes"]
    assert lanes["available"] is True and lanes["share"] == 1.0
    (up,) = lanes["upstreams"]
    assert up["name"] == "default" and up["health"]["up"] is True
    (lane,) = up["lanes"]
    assert lane["model"] == "fake-model" and lane["sent"] == 9 and lane["in_flight"] == 0
    assert lane["window_max"] == up["max_concurrency"] and lane["rpm_limit"] is None
    assert 1 <= lane["window"] <= lane["window_max"] and isinstance(lane["slow_start"], bool)
    assert "url" not in str(up).lower()


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)  # no SQL involved: one back end
def test_api_only_server_says_lanes_are_elsewhere(
    make_server: Callable[..., Server], fake_upstream: FakeUpstreamHandle
) -> None:
    server = make_server(fake_upstream.base_url, batchd_run_worker="false")
    lanes = state(server)["lanes"]
    assert lanes["available"] is False and lanes["upstreams"] == []
    assert lanes["reason"].startswith("lanes not in this process")


def test_keys_scope_state_and_cancel(
    make_server: Callable[..., Server], fake_upstream: FakeUpstreamHandle
) -> None:
    fake_upstream.configure(latency=0.05)  # 1,000 lines at 2 in flight: ~25 s, cancelled long before
    server = make_server(fake_upstream.base_url, batchd_upstream_concurrency="2")
    alpha = new_key_in_process(server, "alpha")
    beta = new_key_in_process(server, "beta")
    admin = new_key_in_process(server, "ops", admin=True)
    wait_auth_on(server)
    assert httpx.get(root(server) + "/dashboard/auth-mode").json() == {"mode": "key"}
    assert httpx.get(root(server) + "/dashboard").status_code == 200  # the page needs no key

    unauth = raw(server, "GET", "/dashboard/state", None)
    assert unauth.status_code == 401 and unauth.json()["error"]["code"] == "invalid_api_key"
    assert raw(server, "GET", "/dashboard/state", "bd-wrong-key-000").status_code == 401

    a_batch = submit(client(server, alpha), [request_line(i) for i in range(1000)])
    b_batch = submit(client(server, beta), [request_line(i) for i in range(1000)])

    mine = state(server, alpha)
    assert [b["id"] for b in mine["batches"]] == [a_batch.id]
    assert mine["principal"] == {"project": "alpha", "is_admin": False, "open_mode": False}
    assert mine["lanes"]["available"] is False and mine["lanes"]["upstreams"] == []
    assert mine["lanes"]["reason"] == "upstream lanes are shown to admin keys only"
    every = state(server, admin)
    assert {b["id"] for b in every["batches"]} == {a_batch.id, b_batch.id}
    assert {b["project"] for b in every["batches"]} == {"alpha", "beta"}
    assert every["lanes"]["available"] is True

    # A project key cannot reach another project's batch, even through the dashboard route.
    foreign = raw(server, "POST", f"/dashboard/batches/{b_batch.id}/cancel", alpha)
    assert foreign.status_code == 404 and foreign.json()["error"]["code"] == "batch_not_found"
    # An admin can cancel any project's batch from the dashboard; the answer is a Batch.
    r = raw(server, "POST", f"/dashboard/batches/{b_batch.id}/cancel", admin)
    assert r.status_code == 200 and r.json()["status"] in ("cancelling", "cancelled")
    assert_schema("Batch", r.json())
    assert raw(server, "POST", "/dashboard/batches/batch_nope/cancel", admin).status_code == 404
    own = raw(server, "POST", f"/dashboard/batches/{a_batch.id}/cancel", alpha)
    assert own.status_code == 200 and own.json()["status"] in ("cancelling", "cancelled")
    assert wait_terminal(client(server, beta), b_batch.id).status == "cancelled"
    assert alpha not in server.log() and admin not in server.log()
