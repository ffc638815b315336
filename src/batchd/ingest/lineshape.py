"""The shape of a valid input line as msgspec structs: the fast path of validation.

A line that decodes into ``Line`` is valid as far as one line can tell: ``custom_id`` a
non-empty string, ``method`` "POST", ``url`` the batch's endpoint, ``body`` an object with no
field that could steer the request elsewhere and no ``stream: true``, ``model`` a string if
present. Decoding into a struct skips every other field without building it, which is why this
is several times faster than decoding the line into Python objects. Any line that does not
fit goes through ``LineChecker`` (orjson), which says precisely what is wrong.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal

import msgspec

# Body fields that could steer where a request goes or with which credentials (SDK client
# options some servers honour in a body); a line carrying one fails validation.
FORBIDDEN_BODY_FIELDS = frozenset(
    {
        "api_key",
        "api_base",
        "base_url",
        "api_type",
        "api_version",
        "azure_endpoint",
        "azure_ad_token",
        "extra_headers",
        "extra_query",
        "headers",
        "organization",
        "project",
        "default_headers",
        "default_query",
        "http_client",
        "proxies",
        "proxy",
    }
)

DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError)

# Any value for a field of this type fails decoding: its presence sends the line to the
# precise checker.
_Absent = msgspec.UnsetType

Body = msgspec.defstruct(
    "Body",
    [
        ("model", str | None, None),
        ("stream", Literal[False] | None, None),
        *((name, _Absent, msgspec.UNSET) for name in sorted(FORBIDDEN_BODY_FIELDS)),
    ],
    gc=False,
)


class IdOnly(msgspec.Struct, gc=False):
    """Just the id, for the pass that confirms duplicate hashes."""

    custom_id: str


@functools.lru_cache(maxsize=64)
def line_type(endpoint: str, model: str | None = None) -> Any:
    """The struct of a valid line for one endpoint (its url is a literal), and once the
    batch's model is known, for that model: a line naming another one then fails to decode
    and goes to the checker, so the fast path never has to compare models itself."""
    body = Body if model is None else _pinned_body(model)
    return msgspec.defstruct(
        "Line",
        [
            ("custom_id", Annotated[str, msgspec.Meta(min_length=1)]),
            ("method", Literal["POST"]),
            ("url", Literal[endpoint]),  # type: ignore[valid-type]
            ("body", body),
        ],
        gc=False,
    )


def _pinned_body(model: str) -> Any:
    return msgspec.defstruct(
        "Body",
        [
            ("model", Literal[model] | None, None),  # type: ignore[valid-type]
            ("stream", Literal[False] | None, None),
            *((name, _Absent, msgspec.UNSET) for name in sorted(FORBIDDEN_BODY_FIELDS)),
        ],
        gc=False,
    )


@functools.lru_cache(maxsize=64)
def line_decoder(endpoint: str, model: str | None = None) -> msgspec.json.Decoder[Any]:
    return msgspec.json.Decoder(line_type(endpoint, model))


ID_DECODER = msgspec.json.Decoder(IdOnly)


def custom_id_of(line: bytes) -> str:
    """The custom_id of a validated input line (any number in it, even past a float's range,
    is skipped unread: orjson would refuse the line)."""
    return str(ID_DECODER.decode(line).custom_id)


class Sendable(msgspec.Struct, gc=False):
    """What dispatch reads of a validated line: the id, and the body's bytes untouched."""

    custom_id: str
    body: msgspec.Raw


class Limits(msgspec.Struct, gc=False):
    """The output limits a body may set, for the token estimate. Raw: any value (a string,
    ``1e400``) reads without error, and only a plain integer counts (``max_output``)."""

    max_completion_tokens: msgspec.Raw = msgspec.Raw()
    max_tokens: msgspec.Raw = msgspec.Raw()
    max_output_tokens: msgspec.Raw = msgspec.Raw()

    def max_output(self) -> int:
        for raw in (self.max_completion_tokens, self.max_tokens, self.max_output_tokens):
            try:
                value = int(bytes(raw))
            except ValueError:  # absent, not an integer, or past Python's digit limit
                continue
            if value:
                return value
        return 0


class _Nothing(msgspec.Struct):
    """Every field skipped: decoding checks only that the bytes are one JSON value."""


SYNTAX = msgspec.json.Decoder(_Nothing)
SENDABLE = msgspec.json.Decoder(Sendable)
LIMITS = msgspec.json.Decoder(Limits)
