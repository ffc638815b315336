"""The upstream seam, shaped like httpx's transport: one ``send`` and one ``aclose``.

The engine only sees this, so the HTTP client can be swapped (and measured) freely, and unit
tests can pass a ``MockUpstream`` that answers from a function.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class UpstreamResponse:
    status: int
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)


class UpstreamError(Exception):
    """The request got no HTTP answer."""

    code = "upstream_unreachable"


class UpstreamTimeout(UpstreamError):
    code = "request_timeout"


def request_headers(api_key: str | None) -> dict[str, str]:
    """The headers every upstream request carries."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


class Upstream(Protocol):
    async def send(self, path: str, body: bytes, timeout: float) -> UpstreamResponse: ...

    async def aclose(self) -> None: ...


class MockUpstream:
    """Answers every request from ``handler(path, body)``; for unit tests without sockets."""

    def __init__(self, handler: Callable[[str, bytes], Awaitable[UpstreamResponse]]):
        self.handler = handler

    async def send(self, path: str, body: bytes, timeout: float) -> UpstreamResponse:
        return await self.handler(path, body)

    async def aclose(self) -> None:
        return None
