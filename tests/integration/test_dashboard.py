"""The dashboard in a real browser: headless Chromium (Debian's ``chromium``) driven by
Playwright against a real ``batchd serve``.

Opens the page, watches a running batch's progress advance, cancels it from the page, and
saves screenshots to the test's tmp dir and to ``tests/artifacts/`` (git-ignored). Any console
error or uncaught page error fails the test. ``.ci/run`` installs ``chromium`` when it is
missing and sets ``BATCHD_REQUIRE_CHROMIUM=1``, so CI fails instead of skipping.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from batchd.testing.fake_upstream import FakeUpstreamHandle
from tests.integration.test_tenancy import client as keyed_client
from tests.integration.test_tenancy import new_key_in_process, wait_auth_on
from tests.support import ROOT, Server, jsonl, request_line, wait_terminal, wait_until

CHROMIUM = os.environ.get("BATCHD_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = ROOT / "tests" / "artifacts"
LINES = 2000


def _unavailable(reason: str) -> None:
    if os.environ.get("BATCHD_REQUIRE_CHROMIUM"):
        pytest.fail(f"{reason} (BATCHD_REQUIRE_CHROMIUM is set)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed (pip install -e '.[test]')")
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        _unavailable(f"no Chromium at {CHROMIUM}: apt-get install -y chromium (.ci/run does)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


class Page:
    """A fresh browser page that records console errors, page errors and request URLs."""

    def __init__(self, browser: Any):
        self.context = browser.new_context(viewport={"width": 1400, "height": 1000})
        self.page = self.context.new_page()
        self.page.set_default_timeout(15_000)
        self.errors: list[str] = []
        self.urls: list[str] = []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.on("request", lambda r: self.urls.append(r.url))

    def _console(self, message: Any) -> None:
        if message.type == "error":
            self.errors.append(f"console: {message.text}")

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def open_page(browser: Any) -> Iterator[Callable[[], Page]]:
    pages: list[Page] = []

    def make() -> Page:
        pages.append(Page(browser))
        return pages[-1]

    yield make
    for p in pages:
        p.close()


def screenshot(page: Any, tmp_path: Path, name: str) -> Path:
    out = tmp_path / name
    page.screenshot(path=str(out), full_page=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out, ARTIFACTS / name)
    return out


def submit(client: Any, lines: list[Any]) -> Any:
    f = client.files.create(file=("batch.jsonl", jsonl(lines)), purpose="batch")
    return client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")


def test_watch_progress_and_cancel_from_the_page(
    make_server: Callable[..., Server],
    fake_upstream: FakeUpstreamHandle,
    open_page: Callable[[], Page],
    backend: dict[str, str],
    tmp_path: Path,
) -> None:
    # Two requests in flight, 50 ms each: the batch would take ~50 s; it is cancelled long before.
    fake_upstream.configure(latency=0.05)
    server = make_server(fake_upstream.base_url, batchd_upstream_concurrency="2")
    client = server.client()
    p = open_page()
    page = p.page
    page.goto(server.base_url[:-3] + "/")  # "/" redirects to the dashboard
    assert page.url.endswith("/dashboard")
    page.locator("#no-batches").wait_for()

    batch = submit(client, [request_line(i) for i in range(LINES)])
    row = page.locator(f'tr[data-batch-id="{batch.id}"]')
    row.wait_for()

    def done() -> int:
        return int(row.locator(".done").get_attribute("data-done") or 0)

    first = wait_until(lambda: row.get_attribute("data-status") == "in_progress" and done(), 20, what="work")
    second = wait_until(lambda: (d := done()) > first and d, 20, what="progress to advance on the page")
    assert first < second < LINES
    assert int(row.locator("progress").get_attribute("max") or 0) == LINES
    # A rate appears once two polls saw progress; the chart and the lane follow.
    wait_until(lambda: row.locator(".rate").inner_text() not in ("–", "0.00"), 20, what="a rate")
    page.locator("#chart polyline").wait_for()
    lanes = page.locator("#lanes tbody")
    wait_until(lambda: "fake-model" in lanes.inner_text(), 10, what="the lane")
    assert "default" in lanes.inner_text() and "up" in lanes.inner_text()
    running = screenshot(page, tmp_path, f"dashboard-running-{backend['BATCHD_TEST_BACKEND']}.png")

    button = row.locator("button.cancel")
    button.click()
    assert button.inner_text() == "Confirm cancel"  # two clicks: one stray click cancels nothing
    button.click()
    wait_until(lambda: row.get_attribute("data-status") in ("cancelling", "cancelled"), 10, what="cancel")
    assert client.batches.retrieve(batch.id).status in ("cancelling", "cancelled")
    ended = wait_terminal(client, batch.id, timeout=30)
    assert ended.status == "cancelled" and ended.request_counts.completed < LINES
    wait_until(lambda: row.get_attribute("data-status") == "cancelled", 10, what="cancelled on the page")
    assert not button.is_visible()
    # The cancelled lines show in the error breakdown by code.
    codes = page.locator("#codes tbody")
    wait_until(lambda: "batch_cancelled" in codes.inner_text(), 10, what="batch_cancelled counted")
    screenshot(page, tmp_path, f"dashboard-cancelled-{backend['BATCHD_TEST_BACKEND']}.png")
    assert running.stat().st_size > 10_000
    assert p.errors == [], p.errors


# Scoping itself is SQL that test_dashboard_api covers on both back ends; in the browser, SQLite.
@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_keys_scope_the_page_and_never_reach_a_url(
    make_server: Callable[..., Server],
    fake_upstream: FakeUpstreamHandle,
    open_page: Callable[[], Page],
    tmp_path: Path,
) -> None:
    server = make_server(fake_upstream.base_url)
    # Playwright's sync API runs an event loop on this thread: make the keys on another one.
    with ThreadPoolExecutor(1) as pool:
        alpha, admin, beta = pool.map(
            lambda a: new_key_in_process(server, a[0], admin=a[1]),
            [("alpha", False), ("ops", True), ("beta", False)],
        )
    wait_auth_on(server)
    mine = submit(keyed_client(server, alpha), [request_line(i) for i in range(3)])
    theirs = submit(keyed_client(server, beta), [request_line(i) for i in range(3)])

    p = open_page()
    page = p.page
    page.goto(server.base_url[:-3] + "/dashboard")
    page.locator("#login").wait_for()  # keys exist: the page asks before fetching any data
    page.fill("#key-input", alpha)
    page.click("#key-form button[type=submit]")
    page.locator(f'tr[data-batch-id="{mine.id}"]').wait_for()
    assert page.locator(f'tr[data-batch-id="{theirs.id}"]').count() == 0
    assert "project alpha" in page.inner_text("#scope")
    assert "admin keys only" in page.inner_text("#lanes-note")

    page.click("#forget")
    page.locator("#login").wait_for()
    assert page.evaluate("sessionStorage.length") == 0
    page.fill("#key-input", admin)
    page.click("#key-form button[type=submit]")
    page.locator(f'tr[data-batch-id="{theirs.id}"]').wait_for()
    page.locator(f'tr[data-batch-id="{mine.id}"]').wait_for()
    assert "every project" in page.inner_text("#scope")
    page.locator("#lanes tbody tr").first.wait_for()
    screenshot(page, tmp_path, "dashboard-admin.png")

    for key in (alpha, admin):
        assert not any(key in u for u in p.urls), "a key reached a URL"
        assert key not in server.log()
    assert any("/v1/dashboard/state" in u for u in p.urls)
    assert p.errors == [], p.errors

    # The console check itself can fail: an error logged by a page is caught.
    probe = open_page()
    probe.page.goto(server.base_url[:-3] + "/dashboard")
    probe.page.evaluate("console.error('probe')")
    wait_until(lambda: probe.errors == ["console: probe"], 5, what="the console listener")
