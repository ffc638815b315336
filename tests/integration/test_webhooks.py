"""Webhooks end to end: a real server, a receiver on loopback (allow-listed, plain http
allowed), every delivery verified with the ``standardwebhooks`` package; retries, a restart
between a failed attempt and the delivery, the SSRF refusals at create and at delivery, and
one event of each kind."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx2 as httpx
import openai
import pytest
import standardwebhooks
from aiohttp import web

from batchd.testing.fake_upstream import FakeUpstreamHandle
from tests.integration.test_tenancy import new_key_in_process
from tests.support import Server, jsonl, request_line, wait_terminal, wait_until

LOOPBACK_OK = {"batchd_webhook_allow_http": "true", "batchd_webhook_allow_networks": "127.0.0.1/32"}


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def event(self) -> dict[str, Any]:
        return json.loads(self.body)  # type: ignore[no-any-return]


class Receiver:
    """An aiohttp server on 127.0.0.1 in its own thread that records every POST and answers
    503 while ``failing`` (or to the first ``fail_first[path]`` requests to a path), else 204."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.fail_first: dict[str, int] = {}
        self.failing = False
        self.loop = asyncio.new_event_loop()
        self.port = self.loop.run_until_complete(self._start())
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    async def _start(self) -> int:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    async def _handle(self, request: web.Request) -> web.Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.received.append(Received(request.path, headers, await request.read()))
        if self.failing or len(self.at(request.path)) <= self.fail_first.get(request.path, 0):
            return web.Response(status=503, text="receiver down")
        return web.Response(status=204)

    def url(self, path: str = "/hook", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def at(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def admin_key(server: Server, project: str) -> str:
    """An admin key made in-process; then wait until the server has left open mode."""
    key = new_key_in_process(server, project, admin=True)
    wait_until(
        lambda: httpx.get(server.base_url + "/files", timeout=10).status_code == 401, 10, what="keys to apply"
    )
    return key


def admin(server: Server, key: str, method: str, path: str, **kw: Any) -> httpx.Response:
    return httpx.request(
        method,
        server.base_url + "/admin" + path,
        headers={"authorization": f"Bearer {key}"},
        timeout=10,
        **kw,
    )


def sdk(server: Server, key: str) -> openai.OpenAI:
    http = openai.DefaultHttpxClient(event_hooks={"response": [server.hook]})
    return openai.OpenAI(base_url=server.base_url, api_key=key, http_client=http, max_retries=0)


def submit(client: openai.OpenAI, lines: list[Any], window: str = "24h", **extra: Any) -> Any:
    f = client.files.create(file=("b.jsonl", jsonl(lines)), purpose="batch")
    return client.batches.create(
        input_file_id=f.id,
        endpoint="/v1/chat/completions",
        completion_window=window,  # type: ignore[arg-type]
        extra_body=extra or None,
    )


def verify(secret: str, got: Received) -> dict[str, Any]:
    """Check the delivery with the Standard Webhooks reference verifier (and its shape)."""
    event = standardwebhooks.Webhook(secret).verify(got.body, got.headers)
    assert got.headers["webhook-id"] == event["id"] and event["id"].startswith("evt_")
    assert got.headers["content-type"] == "application/json"
    assert set(event) == {"id", "object", "created_at", "type", "data"} and event["object"] == "event"
    assert set(event["data"]) == {"id"}
    return event  # type: ignore[no-any-return]


def deliveries(server: Server, key: str, project: str, **params: Any) -> list[dict[str, Any]]:
    r = admin(server, key, "GET", f"/projects/{project}/webhook_deliveries", params=params)
    assert r.status_code == 200, r.text
    return r.json()["data"]  # type: ignore[no-any-return]


def test_delivered_signed_and_retried(
    make_server: Callable[..., Server], fake_upstream: FakeUpstreamHandle, receiver: Receiver
) -> None:
    """To the batch's own URL and to the project's endpoint; the batch's URL fails twice and
    gets the event on the third attempt."""
    server = make_server(fake_upstream.base_url, batchd_webhook_retry_schedule="0.2,0.2,0.2", **LOOPBACK_OK)
    key = admin_key(server, "acme")
    made = admin(server, key, "POST", "/projects/acme/webhooks", json={"url": receiver.url("/project")})
    assert made.status_code == 200, made.text
    endpoint = made.json()
    secret = endpoint["secret"]  # the project's secret, shown once: it was made by this call
    assert secret.startswith("whsec_") and endpoint["object"] == "webhook_endpoint"
    listed = admin(server, key, "GET", "/projects/acme/webhooks").json()["data"]
    assert [e["id"] for e in listed] == [endpoint["id"]] and "secret" not in listed[0]
    shown = admin(server, key, "GET", "/projects/acme/webhook_secret").json()
    assert "secret" not in shown and shown["project"] == "acme"

    client = sdk(server, key)
    receiver.fail_first["/own"] = 2
    own = submit(client, [request_line(i) for i in range(3)], webhook_url=receiver.url("/own"))
    quiet = submit(client, [request_line(i) for i in range(2)])
    for b in (own, quiet):
        assert wait_terminal(client, b.id).status == "completed"
    wait_until(lambda: len(receiver.received) == 5, 30, what="five requests")
    tries = receiver.at("/own")
    assert len(tries) == 3 and len({r.headers["webhook-id"] for r in tries}) == 1
    assert all(verify(secret, r) == verify(secret, tries[0]) for r in tries)
    to_own = tries[-1]
    at_project = receiver.at("/project")
    events = {verify(secret, r)["data"]["id"]: verify(secret, r) for r in at_project}
    assert set(events) == {own.id, quiet.id}
    own_event = verify(secret, to_own)
    assert own_event == events[own.id]  # one event, two destinations, the same id
    assert own_event["type"] == "batch.completed"
    assert own_event["created_at"] == client.batches.retrieve(own.id).completed_at
    # The openai SDK's own verifier accepts it too: batchd signs as OpenAI does.
    unwrapped = openai.OpenAI(api_key="x", webhook_secret=secret).webhooks.unwrap(to_own.body, to_own.headers)
    assert unwrapped.type == "batch.completed" and unwrapped.data.id == own.id
    rows = wait_until(
        lambda: (r := deliveries(server, key, "acme")) and {x["status"] for x in r} == {"delivered"} and r,
        10,
    )
    assert sorted((r["url"].rsplit("/", 1)[1], r["attempts"]) for r in rows) == [
        ("own", 3),
        ("project", 1),
        ("project", 1),
    ]
    assert all(r["last_response_status"] == 204 and r["last_error"] is None for r in rows)

    # Rotation: a new secret signs, and the previous one still does for the grace period.
    rotated = admin(server, key, "POST", "/projects/acme/webhook_secret").json()
    assert rotated["secret"] != secret and rotated["previous_valid_until"] > rotated["created_at"]
    later = submit(client, [request_line(1)])
    wait_terminal(client, later.id)
    wait_until(lambda: len(receiver.at("/project")) == 3, 30, what="a delivery after the rotation")
    last = receiver.at("/project")[-1]
    assert verify(rotated["secret"], last)["data"]["id"] == later.id
    assert verify(secret, last)["data"]["id"] == later.id
    gone = admin(server, key, "DELETE", f"/projects/acme/webhooks/{endpoint['id']}")
    assert gone.status_code == 200 and gone.json()["deleted"] is True
    assert admin(server, key, "DELETE", f"/projects/acme/webhooks/{endpoint['id']}").status_code == 404


def test_delivered_after_a_restart(
    make_server: Callable[..., Server], fake_upstream: FakeUpstreamHandle, receiver: Receiver
) -> None:
    env = {"batchd_webhook_retry_schedule": ",".join(["0.3"] * 60), **LOOPBACK_OK}
    server = make_server(fake_upstream.base_url, **env)
    key = admin_key(server, "acme")
    secret = admin(server, key, "POST", "/projects/acme/webhook_secret").json()["secret"]
    receiver.failing = True
    client = sdk(server, key)
    batch = submit(client, [request_line(1)], webhook_url=receiver.url())
    wait_terminal(client, batch.id)
    wait_until(lambda: len(receiver.received) >= 1, 30, what="a failed attempt")
    server.stop()
    failed_attempts = len(receiver.received)
    receiver.failing = False
    again = make_server(fake_upstream.base_url, **env)  # same data directory and database
    wait_until(lambda: len(receiver.received) > failed_attempts, 30, what="delivery after the restart")
    last = receiver.received[-1]
    assert verify(secret, last)["data"]["id"] == batch.id
    assert last.headers["webhook-id"] == receiver.received[0].headers["webhook-id"]
    (row,) = wait_until(
        lambda: [r for r in deliveries(again, key, "acme") if r["status"] == "delivered"] or None, 10
    )
    assert row["attempts"] >= len(receiver.received) > failed_attempts


@pytest.mark.backends("sqlite")
def test_private_addresses_refused_at_create_and_after_resolution(
    make_server: Callable[..., Server], fake_upstream: FakeUpstreamHandle, receiver: Receiver
) -> None:
    """No allow-list: literal private addresses are a 400 at create; a name that resolves to
    loopback (``localhost``) is accepted at create and refused at every delivery attempt."""
    server = make_server(
        fake_upstream.base_url, batchd_webhook_allow_http="true", batchd_webhook_retry_schedule="0.1"
    )
    key = admin_key(server, "acme")
    client = sdk(server, key)
    f = client.files.create(file=("b.jsonl", jsonl([request_line(1)])), purpose="batch")
    for url in (
        receiver.url(),
        "http://[::1]/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/",
        "ftp://example.com/",
    ):
        with pytest.raises(openai.BadRequestError) as exc:
            client.batches.create(
                input_file_id=f.id,
                endpoint="/v1/chat/completions",
                completion_window="24h",
                extra_body={"webhook_url": url},
            )
        assert exc.value.param == "webhook_url" and exc.value.code == "invalid_value", url
    refused = admin(server, key, "POST", "/projects/acme/webhooks", json={"url": receiver.url()})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "url"
    assert client.batches.list().data == []

    batch = submit(client, [request_line(1)], webhook_url=receiver.url(host="localhost"))
    wait_terminal(client, batch.id)
    (row,) = wait_until(
        lambda: [r for r in deliveries(server, key, "acme") if r["status"] == "failed"] or None, 30
    )
    assert row["attempts"] == 2 and "127.0.0.1" in row["last_error"], row
    assert receiver.received == []


def test_failed_cancelled_and_expired_events(
    make_server: Callable[..., Server], fake_upstream: FakeUpstreamHandle, receiver: Receiver
) -> None:
    fake_upstream.configure(latency=0.2)
    server = make_server(
        fake_upstream.base_url,
        batchd_completion_windows="24h,3s",
        batchd_upstream_concurrency="1",
        batchd_chunk_lines="5",
        **LOOPBACK_OK,
    )
    key = admin_key(server, "acme")
    secret = admin(server, key, "POST", "/projects/acme/webhook_secret").json()["secret"]
    client = sdk(server, key)
    bad = client.files.create(file=("bad.jsonl", b"{not json\n"), purpose="batch")
    failed = client.batches.create(
        input_file_id=bad.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        extra_body={"webhook_url": receiver.url()},
    )
    slow = [request_line(i) for i in range(40)]
    expired = submit(client, slow, window="3s", webhook_url=receiver.url())
    cancelled = submit(client, slow, webhook_url=receiver.url())
    client.batches.cancel(cancelled.id)
    want = {failed.id: "failed", cancelled.id: "cancelled", expired.id: "expired"}
    for bid, status in want.items():
        assert wait_terminal(client, bid, timeout=30).status == status
    wait_until(lambda: len(receiver.received) == 3, 30, what="three events")
    got = {e["data"]["id"]: e for e in (verify(secret, r) for r in receiver.received)}
    assert {bid: e["type"] for bid, e in got.items()} == {bid: f"batch.{s}" for bid, s in want.items()}
    for bid, status in want.items():
        assert got[bid]["created_at"] == getattr(client.batches.retrieve(bid), f"{status}_at")
