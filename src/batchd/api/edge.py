"""The HTTP edge: every ``/v1`` request is authenticated before its body is read, and the
body of every route but the two streaming uploads is read whole, within bounds, and checked
before FastAPI parses it.

FastAPI parses a JSON body before it solves dependencies, so without this a request with a
bad key and a bad body got the body's 400, and a body of any size was read into memory. Here
the order is: key (401), size (413 ``request_too_large``), stall (408 ``request_timeout``),
UTF-8 and JSON syntax (400 ``invalid_json``), nesting (400 ``json_too_deep``), NUL characters
(400 ``invalid_value``: PostgreSQL text cannot hold them). The uploads
(``POST /v1/files``, ``POST /v1/uploads/{id}/parts``) stream through ``ingest.multipart``
with their own byte limits and the same stall limit.
"""

from __future__ import annotations

import re

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from batchd.api.deps import authenticate
from batchd.api.errors import error_response
from batchd.config import Settings
from batchd.errors import BatchdError, InvalidRequest, PayloadTooLarge
from batchd.ingest.body import body_pieces
from batchd.ingest.depth import json_depth_exceeds

STREAMED = re.compile(r"^/v1/(files|uploads/[^/]+/parts)/?$")


def too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"The request body is larger than {limit} bytes, the most this server reads for this route "
        "(setting BATCHD_MAX_REQUEST_BYTES). Upload files with POST /v1/files or /v1/uploads.",
        code="request_too_large",
    )


def too_deep(limit: int) -> InvalidRequest:
    return InvalidRequest(
        f"The JSON body is nested more than {limit} levels deep (setting BATCHD_MAX_JSON_DEPTH).",
        code="json_too_deep",
    )


def check_json_body(body: bytes, max_depth: int) -> None:
    """Reject a non-empty body that is not UTF-8 JSON, or that nests deeper than ``max_depth``."""
    if not body:
        return
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(
            f"The request body is not valid UTF-8 (byte {exc.start}).", code="invalid_json"
        ) from exc
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if "depth" in str(exc) or "recursion" in str(exc):
            raise too_deep(max_depth) from exc
        raise InvalidRequest(
            f"We could not parse the JSON body of your request: {exc}.", code="invalid_json"
        ) from exc
    if json_depth_exceeds(body, max_depth):
        raise too_deep(max_depth)
    if b"\\u0000" in body:
        # Names, ids and metadata end up in text columns, and PostgreSQL refuses NUL in text.
        raise InvalidRequest(
            "NUL characters (\\u0000) are not allowed in request bodies.", code="invalid_value"
        )


async def read_bounded(receive: Receive, limit: int, idle_timeout: float) -> bytes:
    body = bytearray()
    async for piece in body_pieces(receive, idle_timeout):
        body += piece
        if len(body) > limit:
            raise too_large(limit)
    return bytes(body)


class EdgeGuard:
    """Authenticate, then read and check the body (see the module docstring)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path == "/v1" or path.startswith("/v1/")):
            await self.app(scope, receive, send)
            return
        settings: Settings = scope["app"].state.settings
        try:
            await authenticate(Request(scope))
            if "\x00" in path:
                raise InvalidRequest("NUL characters are not allowed in URLs.", code="invalid_value")
            if scope["method"] == "POST" and STREAMED.match(path):
                await self.app(scope, receive, send)
                return
            declared = dict(scope["headers"]).get(b"content-length", b"")
            if declared.isdigit() and int(declared) > settings.max_request_bytes:
                raise too_large(settings.max_request_bytes)
            body = await read_bounded(receive, settings.max_request_bytes, settings.body_idle_timeout)
            check_json_body(body, settings.max_json_depth)
        except ClientDisconnect:
            return
        except BatchdError as exc:
            rid = scope.get("state", {}).get("request_id", "")
            await error_response(exc, rid)(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the app the body already read, then the real channel."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
