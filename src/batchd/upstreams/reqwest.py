"""OpenAI-compatible upstreams over HTTP, with pyreqwest (Rust's reqwest and hyper).

The default client, chosen by measurement (docs/benchmarks.md, "HTTP client"): on this 2-core
machine against the same FakeUpstream it spends about half the CPU per request that aiohttp
does, because connection pooling, HTTP parsing and timeouts run in Rust, off the event loop's
thread. ``BATCHD_UPSTREAM_CLIENT=aiohttp`` selects ``HttpUpstream`` instead.
"""

from __future__ import annotations

from datetime import timedelta

from pyreqwest.client import Client, ClientBuilder
from pyreqwest.exceptions import PyreqwestError, RequestTimeoutError

from batchd.upstreams.base import UpstreamError, UpstreamResponse, UpstreamTimeout, request_headers

_KEEP = frozenset({"x-request-id", "retry-after", "retry-after-ms"})


def _describe(exc: PyreqwestError) -> str:
    """``connection error: Connection refused (os error 111)``: the error and its root cause."""
    message = str(exc.args[0]) if exc.args else type(exc).__name__
    details = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], dict) else {}
    causes = details.get("causes") or []
    root = causes[-1].get("message") if causes and isinstance(causes[-1], dict) else None
    return f"{message}: {root}" if root else message


class ReqwestUpstream:
    def __init__(self, base_url: str, api_key: str | None, max_connections: int):
        self.base_url = base_url.rstrip("/")
        self._headers = request_headers(api_key)
        self._max_connections = max_connections
        self._client: Client | None = None
        self._timeouts: dict[float, timedelta] = {}

    def _session(self) -> Client:
        if self._client is None:
            self._client = (
                ClientBuilder()
                .max_connections(self._max_connections)
                .default_headers(self._headers)
                .no_proxy()  # as aiohttp: proxies from the environment are not used
                .build()
            )
        return self._client

    def _timeout(self, seconds: float) -> timedelta:
        # Nearly every request has the configured timeout: reuse its timedelta.
        t = self._timeouts.get(seconds)
        if t is None:
            t = timedelta(seconds=seconds)
            if len(self._timeouts) < 4:
                self._timeouts[seconds] = t
        return t

    async def send(self, path: str, body: bytes, timeout: float) -> UpstreamResponse:
        """POST ``body`` to ``{base_url}{path}``; ``path`` is the line's url without ``/v1``."""
        try:
            request = self._session().post(self.base_url + path).body_bytes(body)
            resp = await request.timeout(self._timeout(timeout)).build().send()
            data = (await resp.bytes()).to_bytes()
        except RequestTimeoutError as exc:
            raise UpstreamTimeout(f"no answer within {timeout:.1f}s") from exc
        except PyreqwestError as exc:
            raise UpstreamError(_describe(exc)) from exc
        kept = {}
        for name, value in resp.headers.items():  # names come lower-cased
            if name[:1] in "xr" and (name in _KEEP or name.startswith("x-ratelimit-")):
                kept[name] = value
        return UpstreamResponse(resp.status, data, kept)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
