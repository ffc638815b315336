"""Streaming multipart/form-data: file bytes go on to storage as they arrive, never whole.

Starlette's ``request.form()`` spools files to temporary files first; we feed
python-multipart's push parser from the request stream and hand each piece on at once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from batchd.errors import InvalidRequest
from batchd.ingest.body import body_pieces

MAX_FIELD_BYTES = 64 * 1024


@dataclass
class PartStart:
    name: str
    filename: str | None
    content_type: str | None


@dataclass
class _Events:
    """What the sync parser callbacks saw during one ``write``; drained after each feed."""

    items: list[tuple[str, Any]] = field(default_factory=list)
    header_field: bytearray = field(default_factory=bytearray)
    header_value: bytearray = field(default_factory=bytearray)
    headers: dict[str, bytes] = field(default_factory=dict)


def boundary_of(request: Request) -> bytes:
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or not params.get(b"boundary"):
        raise InvalidRequest("The request must be multipart/form-data with a boundary.")
    return params[b"boundary"]


def _parser(boundary: bytes, ev: _Events) -> MultipartParser:
    def on_header_field(data: bytes, start: int, end: int) -> None:
        ev.header_field += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        ev.header_value += data[start:end]

    def on_header_end() -> None:
        ev.headers[bytes(ev.header_field).lower().decode("latin-1")] = bytes(ev.header_value)
        ev.header_field.clear()
        ev.header_value.clear()

    def on_headers_finished() -> None:
        _, opts = parse_options_header(ev.headers.get("content-disposition", b""))
        name = opts.get(b"name", b"").decode("utf-8", "replace")
        filename = opts.get(b"filename")
        ctype = ev.headers.get("content-type")
        ev.items.append(
            (
                "start",
                PartStart(
                    name,
                    filename.decode("utf-8", "replace") if filename is not None else None,
                    ctype.decode("latin-1") if ctype else None,
                ),
            )
        )
        ev.headers.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        ev.items.append(("data", data[start:end]))

    def on_part_end() -> None:
        ev.items.append(("end", None))

    return MultipartParser(
        boundary,
        {
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )


async def iter_multipart(request: Request, idle_timeout: float) -> AsyncIterator[tuple[str, Any]]:
    """Yield ("start", PartStart), ("data", bytes), ("end", None) in order. A body that stalls
    for ``idle_timeout`` seconds raises ``RequestTimeout`` (the caller drops what it stored)."""
    ev = _Events()
    parser = _parser(boundary_of(request), ev)
    try:
        async for piece in body_pieces(request.receive, idle_timeout):
            parser.write(piece)
            for item in ev.items:
                yield item
            ev.items.clear()
        parser.finalize()
    except MultipartParseError as exc:
        raise InvalidRequest(f"Malformed multipart body: {exc}") from exc
    except ClientDisconnect as exc:
        raise InvalidRequest("The client went away before the upload finished.") from exc
    for item in ev.items:
        yield item
