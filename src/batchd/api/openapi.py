"""The server's own OpenAPI document, made to say what the server does: every error status a
route can answer (in OpenAI's envelope), no FastAPI 422 (batchd never sends one: they become
400s), and the multipart bodies of the two streaming uploads, which FastAPI cannot see because
those handlers read the request themselves."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from batchd import protocol as p

_ERRORS = {
    400: "Invalid request (OpenAI's error envelope; `param` names the field)",
    401: "Missing, unknown or revoked API key (`invalid_api_key`)",
    404: "Unknown id, or another project's (`*_not_found` or null code)",
    408: "The request body stalled (`request_timeout`, BATCHD_BODY_IDLE_TIMEOUT)",
    413: "Body, file or part too large (`request_too_large`, `file_too_large`, `part_too_large`)",
    429: "A project quota would be passed (`quota_exceeded`)",
    503: "The blob store is unavailable (`storage_unavailable`); retry",
}


def error_responses(*extra: int) -> dict[int | str, dict[str, Any]]:
    """Error responses for a router: the common ones plus ``extra`` (403 for admin routes)."""
    codes = sorted({*_ERRORS, *extra})
    return {
        c: {"model": p.ErrorResponse, "description": _ERRORS.get(c, "Admin API key required")} for c in codes
    }


FILE_UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file", "purpose"],
                "properties": {
                    "file": {"type": "string", "format": "binary"},
                    "purpose": {"type": "string", "enum": list(p.UPLOAD_PURPOSES)},
                    "expires_after[anchor]": {"type": "string", "enum": ["created_at"]},
                    "expires_after[seconds]": {
                        "type": "integer",
                        "minimum": p.MIN_EXPIRES_AFTER,
                        "maximum": p.MAX_EXPIRES_AFTER,
                    },
                },
            }
        }
    },
}

PART_UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["data"],
                "properties": {"data": {"type": "string", "format": "binary"}},
            }
        }
    },
}


def install(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        for ops in doc.get("paths", {}).values():
            for op in ops.values():
                op.get("responses", {}).pop("422", None)
        schemas = doc.get("components", {}).get("schemas", {})
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
