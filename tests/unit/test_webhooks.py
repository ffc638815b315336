"""Webhooks without a server: the SSRF policy and its resolver, Standard Webhooks signing,
the retry schedule, and the outbox written with the terminal status."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import standardwebhooks
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from batchd.store import Store
from batchd.store.migrate import upgrade
from batchd.webhooks.delivery import event_body, next_attempt
from batchd.webhooks.policy import AddressPolicy, AddressRefused, CheckedResolver, WebhookURLError
from batchd.webhooks.signing import new_secret, sign_headers

STRICT = AddressPolicy()
REFUSED_AT_CREATE = [
    "https://127.0.0.1/hook",
    "https://127.9.9.9:8443/",
    "https://[::1]/",
    "https://[::ffff:127.0.0.1]/",
    "https://10.1.2.3/",
    "https://172.16.0.1/",
    "https://192.168.1.1/",
    "https://169.254.169.254/latest/meta-data/",
    "https://100.64.0.1/",
    "https://0.0.0.0/",
    "https://224.0.0.1/",
    "https://240.0.0.1/",
    "https://[fe80::1]/",
    "https://[fd00::1]/",
    "https://2130706433/",  # 127.0.0.1 as one number
    "https://0x7f.1/",  # 127.0.0.1 in hex and short form
    "https://127.1/",
    "http://example.com/hook",  # plain http not allowed
    "ftp://example.com/hook",
    "https:///nohost",
    "https://user:pw@example.com/",
    "https://example.com:0/",
    "not a url",
    "https://example.com/" + "x" * 2100,
]


@pytest.mark.parametrize("url", REFUSED_AT_CREATE)
def test_policy_refuses(url: str) -> None:
    with pytest.raises(WebhookURLError):
        STRICT.check_url(url)


def test_policy_allows_public_and_allow_listed() -> None:
    for url in ("https://example.com/hook?token=1", "https://8.8.8.8/", "https://[2001:4860:4860::8888]/"):
        assert STRICT.check_url(url) == url
    # A hostname passes at create: it is judged by what it resolves to, at delivery.
    assert STRICT.check_url("https://localhost/hook")
    lenient = AddressPolicy.build(True, ["127.0.0.1", "10.0.0.0/8"])
    for url in ("http://127.0.0.1:9/", "https://10.9.8.7/", "http://[::ffff:127.0.0.1]/"):
        assert lenient.check_url(url) == url
    with pytest.raises(WebhookURLError):
        lenient.check_url("http://127.0.0.2/")  # only the one address was allowed
    with pytest.raises(WebhookURLError):
        lenient.check_url("http://192.168.0.1/")


class FixedResolver(AbstractResolver):
    """Answers every name with the given addresses, as a rebinding DNS server would."""

    def __init__(self, *addresses: str):
        self.addresses = addresses

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            {"hostname": host, "host": a, "port": port, "family": family, "proto": 0, "flags": 0}
            for a in self.addresses
        ]

    async def close(self) -> None:
        pass


def test_resolver_refuses_what_localhost_resolves_to() -> None:
    """``localhost`` passes the create-time check (it is no literal address); the resolver
    refuses it, because it resolves to loopback. Resolved for real, by the system resolver."""
    STRICT.check_url("https://localhost/")

    async def go() -> None:
        resolver = CheckedResolver(STRICT)
        with pytest.raises(AddressRefused, match="127.0.0.1"):
            await resolver.resolve("localhost", 443)
        await resolver.close()
        allowed = CheckedResolver(AddressPolicy.build(False, ["127.0.0.0/8"]))
        got = await allowed.resolve("localhost", 443)
        assert got and {r["host"] for r in got} == {"127.0.0.1"}
        await allowed.close()

    asyncio.run(go())


def test_resolver_keeps_only_allowed_addresses() -> None:
    async def go() -> None:
        mixed = CheckedResolver(STRICT, FixedResolver("93.184.216.34", "10.0.0.5"))
        assert [r["host"] for r in await mixed.resolve("rebind.example")] == ["93.184.216.34"]
        private = CheckedResolver(STRICT, FixedResolver("169.254.169.254", "::1"))
        with pytest.raises(AddressRefused):
            await private.resolve("rebind.example")

    asyncio.run(go())


def test_client_with_the_resolver_never_connects(unused_port_receiver: tuple[int, list[Any]]) -> None:
    """End to end through aiohttp: a name that resolves to loopback is refused before any
    connection, so the receiver on 127.0.0.1 sees nothing."""
    port, hits = unused_port_receiver

    async def go() -> None:
        connector = aiohttp.TCPConnector(resolver=CheckedResolver(STRICT), use_dns_cache=False)
        async with aiohttp.ClientSession(connector=connector) as session:
            with pytest.raises(aiohttp.ClientConnectorError, match="127.0.0.1"):
                await session.post(f"http://localhost:{port}/hook", data=b"{}")
        lenient = CheckedResolver(AddressPolicy.build(True, ["127.0.0.1/32"]))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=lenient)) as session:
            async with session.post(f"http://localhost:{port}/hook", data=b"{}") as resp:
                assert resp.status == 200

    asyncio.run(go())
    assert len(hits) == 1


@pytest.fixture
def unused_port_receiver() -> Iterator[tuple[int, list[Any]]]:
    """A loopback HTTP server in a thread that counts what it receives."""
    import threading

    hits: list[Any] = []
    loop = asyncio.new_event_loop()
    runner: list[web.AppRunner] = []

    async def handle(request: web.Request) -> web.Response:
        hits.append(await request.read())
        return web.Response(status=200)

    async def start() -> int:
        app = web.Application()
        app.router.add_post("/hook", handle)
        r = web.AppRunner(app)
        await r.setup()
        site = web.TCPSite(r, "127.0.0.1", 0)
        await site.start()
        runner.append(r)
        return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    port = loop.run_until_complete(start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield port, hits
    asyncio.run_coroutine_threadsafe(runner[0].cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def test_signature_verifies_with_standard_webhooks_and_the_openai_sdk() -> None:
    secret = new_secret()
    assert secret.startswith("whsec_")
    row = {"event_id": "evt_abc", "event_created_at": 1_700_000_000, "event_type": "batch.completed"}
    body = event_body({**row, "batch_id": "batch_123"})
    assert json.loads(body) == {
        "id": "evt_abc",
        "object": "event",
        "created_at": 1_700_000_000,
        "type": "batch.completed",
        "data": {"id": "batch_123"},
    }
    now = int(time.time())
    headers = sign_headers([secret], "evt_abc", now, body)
    assert standardwebhooks.Webhook(secret).verify(body, headers)["data"]["id"] == "batch_123"
    event = openai.OpenAI(api_key="x", webhook_secret=secret).webhooks.unwrap(body, headers)
    assert event.type == "batch.completed" and event.data.id == "batch_123"
    # During a rotation both secrets sign; a receiver holding either one accepts.
    old = new_secret()
    both = sign_headers([secret, old], "evt_abc", now, body)
    assert len(both["webhook-signature"].split(" ")) == 2
    standardwebhooks.Webhook(old).verify(body, both)
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(new_secret()).verify(body, both)
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(secret).verify(body + b" ", headers)


def test_retry_schedule() -> None:
    schedule = [5.0, 60.0]
    assert next_attempt(1, 0, 100, schedule, 1000, rand=lambda: 0.5) == 105.0
    assert next_attempt(2, 0, 100, schedule, 1000, rand=lambda: 0.0) == 100 + 60 * 0.8
    assert next_attempt(2, 0, 100, schedule, 1000, rand=lambda: 1.0) == 100 + 60 * 1.2
    assert next_attempt(3, 0, 100, schedule, 1000) is None  # attempts used up
    assert next_attempt(2, 0, 990, schedule, 1000) is None  # too old by then


# ------------------------------------------------------------------------ the outbox


async def _batch(store: Store, bid: str, project: str = "p", webhook_url: str | None = None) -> None:
    await store.insert_batch(
        id=bid,
        project=project,
        endpoint="/v1/chat/completions",
        input_file_id="file-1",
        completion_window="24h",
        status="validating",
        created_at=1,
        expires_at=2_000_000_000,
        webhook_url=webhook_url,
    )


def test_outbox_rows_come_with_the_terminal_status(db_url: str) -> None:
    upgrade(db_url)

    async def go() -> None:
        store = Store.open(db_url)
        try:
            await store.add_webhook_endpoint(
                id="we_1", project="p", url="https://hooks.example/p", created_at=1
            )
            await _batch(store, "batch_own", webhook_url="https://own.example/h")
            await _batch(store, "batch_same", webhook_url="https://hooks.example/p")
            await _batch(store, "batch_quiet", project="q")
            for bid in ("batch_own", "batch_same", "batch_quiet"):
                assert await store.claim_validation("w1", 10.0, 30.0) is not None
                assert await store.fail_batch(bid, "w1", errors_json="{}", total=0, now=100)
            assert not await store.fail_batch("batch_own", "w1", errors_json="{}", total=0, now=100)
            rows = sorted(
                await store.list_webhook_deliveries("p", limit=10), key=lambda r: (r["batch_id"], r["url"])
            )
            assert [(r["batch_id"], r["url"], r["endpoint_id"]) for r in rows] == [
                ("batch_own", "https://hooks.example/p", "we_1"),
                ("batch_own", "https://own.example/h", None),
                ("batch_same", "https://hooks.example/p", "we_1"),  # one row per distinct URL
            ]
            assert {r["event_type"] for r in rows} == {"batch.failed"}
            assert rows[0]["event_id"] == rows[1]["event_id"] != rows[2]["event_id"]
            assert await store.list_webhook_deliveries("q") == []

            # Leased by one owner at a time; the outcome is fenced by the lease.
            first = await store.lease_webhook_deliveries("w1", 200.0, 30.0, 2)
            rest = await store.lease_webhook_deliveries("w2", 200.0, 30.0, 10)
            assert len(first) == 2 and len(rest) == 1
            assert {r["seq"] for r in first}.isdisjoint(r["seq"] for r in rest)
            assert all(r["attempts"] == 1 for r in first + rest)
            assert await store.lease_webhook_deliveries("w3", 200.0, 30.0, 10) == []
            seq = first[0]["seq"]
            assert not await store.record_webhook_attempt(
                seq, "w2", state="delivered", status=200, error=None, next_attempt_at=None, now=201
            )
            assert await store.record_webhook_attempt(
                seq, "w1", state="pending", status=500, error="HTTP 500", next_attempt_at=210.0, now=201
            )
            assert await store.lease_webhook_deliveries("w3", 205.0, 30.0, 10) == []  # not due yet
            again = await store.lease_webhook_deliveries("w3", 220.0, 30.0, 10)  # others still leased
            assert [(r["seq"], r["attempts"]) for r in again] == [(seq, 2)]
            # An expired lease is taken over; a restarted owner gives its leases back.
            taken = await store.lease_webhook_deliveries("w4", 400.0, 30.0, 10)
            assert {r["seq"] for r in taken} == {r["seq"] for r in first + rest}
            assert await store.release_webhook_leases("w4") == 3
        finally:
            await store.close()

    asyncio.run(go())


def test_secret_rotation_keeps_the_previous_one_for_a_while(db_url: str) -> None:
    upgrade(db_url)

    async def go() -> None:
        store = Store.open(db_url)
        try:
            assert await store.webhook_secret("p") is None
            assert await store.ensure_webhook_secret("p", "whsec_one", 10)
            assert not await store.ensure_webhook_secret("p", "whsec_two", 11)
            row = await store.rotate_webhook_secret("p", "whsec_three", 20, 100)
            assert (row["secret"], row["previous_secret"], row["previous_until"]) == (
                "whsec_three",
                "whsec_one",
                120,
            )
        finally:
            await store.close()

    asyncio.run(go())


def test_cli_manages_endpoints_and_the_secret(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from batchd.cli import app

    runner = CliRunner()
    opts = ["--project", "p", "--data-dir", str(tmp_path)]
    added = runner.invoke(app, ["webhooks", "add", "https://example.com/h", *opts])
    assert added.exit_code == 0, added.output
    ep_id, secret = added.stdout.split("\n")[0].split("\t")[0], added.stdout.split("\n")[1]
    assert ep_id.startswith("we_") and secret.startswith("whsec_")
    second = runner.invoke(app, ["webhooks", "add", "https://example.org/h", *opts])
    assert "whsec_" not in second.stdout  # the secret is shown once
    refused = runner.invoke(app, ["webhooks", "add", "https://10.0.0.1/h", *opts])
    assert refused.exit_code == 2 and "private" in refused.output
    listed = runner.invoke(app, ["webhooks", "list", *opts]).stdout
    assert ep_id in listed and "example.org" in listed
    rotated = runner.invoke(app, ["webhooks", "rotate-secret", *opts]).stdout.strip()
    assert rotated.startswith("whsec_") and rotated != secret
    assert runner.invoke(app, ["webhooks", "remove", ep_id, *opts]).exit_code == 0
    assert runner.invoke(app, ["webhooks", "remove", ep_id, *opts]).exit_code == 1
