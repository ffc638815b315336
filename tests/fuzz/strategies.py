"""Hypothesis strategies for hostile JSONL: each generated line knows the validation error it
must get (``None`` for a valid line), so a test can compare what batchd reports line by line.

The kinds follow issue 7's list: invalid UTF-8, deep nesting, huge numbers, NUL bytes,
duplicate keys, wrong types, missing fields, plus lines that are not JSON objects at all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from batchd.ingest.validate import MAX_LINE_DEPTH

ENDPOINT = "/v1/chat/completions"
MODEL = "fake-model"
FIELDS = ("custom_id", "method", "url", "body")
# Every code a line can get (docs/api.md, "Validation errors"), minus the file-level ones.
LINE_CODES = {
    "invalid_json_line",
    "json_too_deep",
    "missing_required_parameter",
    "invalid_type",
    "invalid_value",
    "duplicate_custom_id",
    "invalid_method",
    "url_mismatch",
    "stream_not_supported",
    "model_mismatch",
    "forbidden_parameter",
    "line_too_long",
}


@dataclass(frozen=True)
class Line:
    raw: bytes
    code: str | None  # the error this line must get, None when valid
    param: str | None = None


def _obj(cid: str, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": cid,
        "method": "POST",
        "url": ENDPOINT,
        "body": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **body},
    }


def _dump(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=20)


@st.composite
def valid(draw: st.DrawFn, cid: str) -> Line:
    content = draw(text)
    return Line(_dump(_obj(cid, messages=[{"role": "user", "content": content}])), None)


@st.composite
def invalid_utf8(draw: st.DrawFn, cid: str) -> Line:
    bad = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xe2\x82", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"]))
    raw = _dump(_obj(cid, messages=[{"role": "user", "content": "@@"}])).replace(b"@@", b"a" + bad + b"b")
    return Line(raw, "invalid_json_line")


@st.composite
def deep(draw: st.DrawFn, cid: str) -> Line:
    """Nesting inside the body: the line itself adds two levels (line, body)."""
    depth = draw(st.one_of(st.integers(1, MAX_LINE_DEPTH + 20), st.integers(250, 1100)))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"k":', "}")]))
    nest = opener * depth + "1" + closer * depth
    raw = _dump(_obj(cid)).replace(b'"model"', b'"x": ' + nest.encode() + b', "model"', 1)
    return Line(raw, None if depth + 2 <= MAX_LINE_DEPTH else "json_too_deep")


@st.composite
def huge_number(draw: st.DrawFn, cid: str) -> Line:
    """JSON allows any number; one past 64 bits or a float's range is sent as written."""
    digits = draw(st.integers(1, 400))
    number = draw(st.sampled_from(["9", "1", "-9"])) + "0" * (digits - 1)
    number += draw(st.sampled_from(["", ".5", "e10", "e400", "e-400"]))
    raw = _dump(_obj(cid)).replace(b'"model"', b'"seed": ' + number.encode() + b', "model"', 1)
    return Line(raw, None)


@st.composite
def nul_byte(draw: st.DrawFn, cid: str) -> Line:
    where = draw(st.sampled_from(["escaped", "raw_in_string", "raw_outside", "escaped_in_model"]))
    base = _dump(_obj(cid, messages=[{"role": "user", "content": "@@"}]))
    if where == "escaped":
        return Line(base.replace(b"@@", b"a\\u0000b"), None)
    if where == "escaped_in_model":
        # Same model on every line, or it would be a model_mismatch: NUL goes in another field.
        return Line(base.replace(b'"model"', b'"user": "x\\u0000y", "model"', 1), None)
    if where == "raw_in_string":
        return Line(base.replace(b"@@", b"a\x00b"), "invalid_json_line")
    return Line(base + b"\x00", "invalid_json_line")


@st.composite
def duplicate_keys(draw: st.DrawFn, cid: str) -> Line:
    """Duplicate keys: the last one wins, in validation and in what is sent upstream."""
    last = draw(st.sampled_from(["ok", "int", "bad_method"]))
    value = {"ok": '"POST"', "int": "7", "bad_method": '"GET"'}[last]
    raw = _dump(_obj(cid))[:-1] + b', "method": ' + value.encode() + b"}"
    code = {"ok": None, "int": "invalid_type", "bad_method": "invalid_method"}[last]
    return Line(raw, code, None if code is None else "method")


@st.composite
def wrong_type(draw: st.DrawFn, cid: str) -> Line:
    field = draw(st.sampled_from(FIELDS))
    value = draw(st.sampled_from([1, 1.5, True, [], ["x"]] + ([{"a": 1}] if field != "body" else ["s"])))
    obj = _obj(cid)
    obj[field] = value
    return Line(_dump(obj), "invalid_type", field)


@st.composite
def missing_field(draw: st.DrawFn, cid: str) -> Line:
    field = draw(st.sampled_from(FIELDS))
    obj = _obj(cid)
    if draw(st.booleans()):
        del obj[field]
    else:
        obj[field] = None
    return Line(_dump(obj), "missing_required_parameter", field)


@st.composite
def not_an_object(draw: st.DrawFn, cid: str) -> Line:
    raw = draw(st.sampled_from([b"[]", b"1", b'"s"', b"null", b"{", b'{"a":}', b"{'a': 1}", b"NaN", b"\x01"]))
    return Line(raw, "invalid_json_line")


KINDS = [valid, invalid_utf8, deep, huge_number, nul_byte, duplicate_keys, wrong_type, missing_field]


def hostile_line(cid: str) -> st.SearchStrategy[Line]:
    return st.one_of(*(k(cid) for k in KINDS), not_an_object(cid))


@st.composite
def hostile_file(draw: st.DrawFn, max_lines: int = 8) -> list[Line]:
    """A file of distinct-custom_id lines, each of a random hostile kind."""
    n = draw(st.integers(1, max_lines))
    return [draw(hostile_line(f"req-{i}")) for i in range(n)]


def expected_errors(lines: list[Line]) -> list[tuple[str, int, str | None]]:
    return [(x.code, i + 1, x.param) for i, x in enumerate(lines) if x.code]
