"""One exception tree for everything a client can be told; rendered once by ``api.errors``.

Each error carries OpenAI's envelope fields. Third-party errors are translated where they
happen and raised ``from`` the original.
"""

from __future__ import annotations


class BatchdError(Exception):
    """Base of every error that reaches a client in OpenAI's envelope."""

    status_code = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def envelope(self) -> dict[str, dict[str, str | None]]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(BatchdError):
    """A request the client must change before sending again (400)."""

    status_code = 400
    type = "invalid_request_error"


class MissingParameter(InvalidRequest):
    code = "missing_required_parameter"

    def __init__(self, param: str):
        super().__init__(f"Missing required parameter: '{param}'.", param=param)


class NotFound(BatchdError):
    """Unknown ids, and ids of other projects: both look the same (404)."""

    status_code = 404
    type = "invalid_request_error"


class Unauthorized(BatchdError):
    status_code = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class Forbidden(BatchdError):
    status_code = 403
    type = "invalid_request_error"
    code = "admin_key_required"


class QuotaExceeded(BatchdError):
    """A project quota would be passed: 429 with ``x-should-retry: false`` (waiting alone
    does not help until the project's batches finish or its files are deleted)."""

    status_code = 429
    type = "rate_limit_error"
    code = "quota_exceeded"


class PayloadTooLarge(InvalidRequest):
    status_code = 413


class RequestTimeout(InvalidRequest):
    """The request body stalled for longer than ``body_idle_timeout``; the connection is closed."""

    status_code = 408
    code = "request_timeout"


class ServiceUnavailable(BatchdError):
    status_code = 503
    type = "server_error"


class StorageError(BatchdError):
    """The blob store failed; the client may retry."""

    status_code = 503
    type = "server_error"
    code = "storage_unavailable"


class BlobMissing(StorageError):
    """The object is not in the store: no retry will bring it back."""
