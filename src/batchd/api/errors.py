"""Every error leaves in OpenAI's envelope with ``x-request-id``; rendered here and only here."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from batchd.errors import BatchdError, InvalidRequest, MissingParameter

log = logging.getLogger(__name__)


def error_response(exc: BatchdError, request_id: str) -> JSONResponse:
    """The one rendering of an error; also used by the edge middleware, which runs outside
    FastAPI's exception handlers."""
    headers = {"x-request-id": request_id}
    if exc.status_code in (409, 429):
        headers["x-should-retry"] = "false"
    if exc.status_code in (408, 413):
        # The body was not read to its end: the connection cannot carry another request.
        headers["connection"] = "close"
    return JSONResponse(exc.envelope(), status_code=exc.status_code, headers=headers)


def _render(request: Request, exc: BatchdError) -> JSONResponse:
    return error_response(exc, getattr(request.state, "request_id", ""))


def translate_validation(exc: RequestValidationError) -> BatchdError:
    """FastAPI's 422 becomes OpenAI's 400 naming the first offending parameter."""
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    param = ".".join(loc) or None
    if first.get("type") == "missing" and param:
        return MissingParameter(param)
    if first.get("type") == "model_attributes_type" and param is None:
        return InvalidRequest(
            "The request body must be a JSON object, sent with Content-Type: application/json.",
            code="invalid_json",
        )
    if first.get("type") == "json_invalid" or param is None:
        return InvalidRequest("We could not parse the JSON body of your request.", code="invalid_json")
    kind = "invalid_type" if str(first.get("type", "")).endswith("_type") else "invalid_value"
    return InvalidRequest(f"Invalid '{param}': {first.get('msg', 'invalid value')}.", param=param, code=kind)


def install(app: FastAPI) -> None:
    @app.exception_handler(BatchdError)
    async def batchd_error(request: Request, exc: BatchdError) -> JSONResponse:
        return _render(request, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _render(request, translate_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = BatchdError(str(exc.detail))
        err.status_code = exc.status_code
        err.type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        if exc.status_code == 404:
            err.message = f"Unknown request URL: {request.method} {request.url.path}."
            err.code = "unknown_url"
        elif exc.status_code == 405:
            err.code = "method_not_allowed"
        elif exc.status_code == 400:
            # FastAPI's "There was an error parsing the body": the edge already rejects bodies
            # that are not UTF-8 or not JSON, so this is a last resort.
            err.code = "invalid_json"
        return _render(request, err)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _render(request, BatchdError("The server had an error while processing your request."))
