"""OpenAI-compatible upstreams over HTTP, with aiohttp.

aiohttp is chosen by measurement (DESIGN.md): several thousand requests/s on two cores where
httpx managed a few hundred.
"""

from __future__ import annotations

import aiohttp

from batchd.upstreams.base import UpstreamError, UpstreamResponse, UpstreamTimeout, request_headers

_KEEP_HEADERS = frozenset({b"x-request-id", b"retry-after", b"retry-after-ms"})


def _kept_headers(raw: tuple[tuple[bytes, bytes], ...]) -> dict[str, str]:
    """The headers the engine reads (the request id, retry hints, rate limits), lower-cased.
    Raw bytes are filtered first: this runs once per request."""
    kept = {}
    for name, value in raw:
        if name[:1] in b"xXrR":
            low = name.lower()
            if low in _KEEP_HEADERS or low.startswith(b"x-ratelimit-"):
                kept[low.decode("latin-1")] = value.decode("latin-1")
    return kept


class HttpUpstream:
    def __init__(self, base_url: str, api_key: str | None, max_connections: int):
        self.base_url = base_url.rstrip("/")
        self._headers = request_headers(api_key)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._max_connections, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(
                connector=connector, headers=self._headers, skip_auto_headers=("User-Agent",)
            )
        return self._session

    async def send(self, path: str, body: bytes, timeout: float) -> UpstreamResponse:
        """POST ``body`` to ``{base_url}{path}``; ``path`` is the line's url without ``/v1``."""
        try:
            async with self._client().post(
                self.base_url + path, data=body, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                data = await resp.read()
                return UpstreamResponse(resp.status, data, _kept_headers(resp.raw_headers))
        except TimeoutError as exc:
            raise UpstreamTimeout(f"no answer within {timeout:.1f}s") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(str(exc) or type(exc).__name__) from exc

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
