"""Reading a request body with a stall limit.

uvicorn bounds the wait between requests (``timeout_keep_alive``) but not the wait inside one:
a client that sends headers and then part of a body holds its connection, its task and (for an
upload) a staging file for as long as it likes. Every body batchd reads goes through here, so a
body that sends nothing for ``idle_timeout`` seconds ends the request with a 408.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from starlette.requests import ClientDisconnect
from starlette.types import Receive

from batchd.errors import RequestTimeout


def stalled(idle_timeout: float) -> RequestTimeout:
    return RequestTimeout(
        f"The request body stalled: nothing arrived for {idle_timeout:g} seconds "
        "(setting BATCHD_BODY_IDLE_TIMEOUT). Send the request again."
    )


async def body_pieces(receive: Receive, idle_timeout: float) -> AsyncIterator[bytes]:
    """The body's pieces as they arrive. Raises ``RequestTimeout`` when the client sends
    nothing for ``idle_timeout`` seconds and ``ClientDisconnect`` when it goes away."""
    while True:
        try:
            message = await asyncio.wait_for(receive(), idle_timeout)
        except TimeoutError as exc:
            raise stalled(idle_timeout) from exc
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        piece = message.get("body", b"")
        if piece:
            yield piece
        if not message.get("more_body", False):
            return
