"""Input-file validation: every problem with its line number, and the chunk plan.

Runs after the batch is created (as OpenAI does): a file with any error fails the batch as a
whole and nothing is sent upstream. The file is streamed in blocks that end at line
boundaries; memory holds one block, the error list (capped) and the custom_id hashes
(``IdSet``: bounded, spilled to disk past ``id_bound``), never the file.

``RangeValidator`` checks one byte range of the file, synchronously, block by block: here
between awaits for a small file, in worker processes for a big one (``ingest/parallel.py``).
Each line is decoded into the struct of a valid line (``lineshape``); only a line that does
not fit is parsed again by ``LineChecker`` to say what is wrong. Ranges report errors with
range-local line numbers, the models they saw and chunks; ``merge`` puts them together.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import orjson
from xxhash import xxh3_64_intdigest

from batchd.blobs import BlobStore
from batchd.errors import BlobMissing
from batchd.ingest.depth import json_depth_exceeds
from batchd.ingest.idset import IdSet, id_hash
from batchd.ingest.lines import BOM
from batchd.ingest.lineshape import (
    DECODE_ERRORS,
    FORBIDDEN_BODY_FIELDS,
    ID_DECODER,
    SENDABLE,
    SYNTAX,
    line_decoder,
)

__all__ = [
    "FORBIDDEN_BODY_FIELDS",
    "IdFinder",
    "LineChecker",
    "Plan",
    "RangeValidator",
    "merge",
    "validate_file",
]

# orjson reads 1024 levels but writes only 254, and dispatch re-serializes each line's body:
# deeper lines are refused here, with their line number, instead of failing when sent.
MAX_LINE_DEPTH = 200

BLOCK_BYTES = 1024 * 1024  # stays in cache across the few passes over a block
_ID = attrgetter("custom_id")
_MODEL = attrgetter("body.model")
DEFAULT_ID_BOUND = 1_000_000


@dataclass
class Plan:
    """What validation learned: errors (if any), line count, the model, and the chunks."""

    errors: list[dict[str, Any]] = field(default_factory=list)
    total: int = 0
    model: str | None = None
    chunks: list[dict[str, int]] = field(default_factory=list)


@dataclass
class RangeResult:
    """One byte range's findings; line numbers are 1-based within the range."""

    lines: int = 0
    total: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    # model -> the first lines that use it (the first one, and up to max_errors more)
    models: dict[str, list[int]] = field(default_factory=dict)
    chunks: list[dict[str, int]] = field(default_factory=list)
    too_many: bool = False


class LineChecker:
    """Says precisely what is wrong with one line; collects errors up to a cap. The slow
    path: only lines that do not decode into the struct of a valid line come here."""

    def __init__(self, endpoint: str, max_lines: int, max_errors: int):
        self.endpoint = endpoint
        self.max_lines = max_lines
        self.max_errors = max_errors
        self.plan = Plan()
        # What the last checked line contributes when its fields were readable.
        self.custom_id: str | None = None
        self.model: str | None = None

    @property
    def full(self) -> bool:
        return len(self.plan.errors) >= self.max_errors

    def error(self, code: str, message: str, line: int | None, param: str | None = None) -> None:
        if not self.full:
            self.plan.errors.append({"code": code, "message": message, "param": param, "line": line})

    def check(self, n: int, text: bytes) -> bool:
        """Validate line ``n`` (1-based); True when it is a valid request line."""
        self.custom_id = self.model = None
        try:
            obj = _loads(text)
        except orjson.JSONDecodeError as exc:
            if "depth" in str(exc):
                self.error("json_too_deep", f"This line nests more than {MAX_LINE_DEPTH} levels deep.", n)
            else:
                self.error("invalid_json_line", "This line is not parseable as valid JSON.", n)
            return False
        if not isinstance(obj, dict):
            self.error("invalid_json_line", "This line is valid JSON but not a JSON object.", n)
            return False
        if json_depth_exceeds(text, MAX_LINE_DEPTH):
            self.error("json_too_deep", f"This line nests more than {MAX_LINE_DEPTH} levels deep.", n)
            return False
        if not self._check_fields(n, obj):
            return False
        try:
            SENDABLE.decode(text)  # what dispatch reads: every 'custom_id' of a repeated key
        except DECODE_ERRORS:
            message = "'custom_id' must be a string, every time the key appears."
            self.error("invalid_type", message, n, "custom_id")
            return False
        return True

    def _check_fields(self, n: int, obj: dict[str, Any]) -> bool:
        ok = True
        for name, kind in (("custom_id", str), ("method", str), ("url", str), ("body", dict)):
            if name not in obj or obj[name] is None:
                self.error("missing_required_parameter", f"Missing required parameter: '{name}'.", n, name)
                ok = False
            elif not isinstance(obj[name], kind):
                want = "an object" if kind is dict else "a string"
                self.error("invalid_type", f"'{name}' must be {want}.", n, name)
                ok = False
        if not ok:
            return False
        cid, body = obj["custom_id"], obj["body"]
        if not cid:
            self.error("invalid_value", "'custom_id' must not be empty.", n, "custom_id")
            ok = False
        else:
            self.custom_id = cid
        if obj["method"] != "POST":
            self.error("invalid_method", "Only the 'POST' method is supported.", n, "method")
            ok = False
        if obj["url"] != self.endpoint:
            self.error(
                "url_mismatch",
                f"The url '{obj['url'][:200]}' does not match the batch endpoint '{self.endpoint}'.",
                n,
                "url",
            )
            ok = False
        for key in body:
            if key in FORBIDDEN_BODY_FIELDS:
                self.error(
                    "forbidden_parameter",
                    f"'body.{key}' is not allowed: a line cannot choose the upstream or its credentials.",
                    n,
                    f"body.{key}",
                )
                ok = False
        if body.get("stream") is True:
            self.error(
                "stream_not_supported",
                "Streaming ('stream': true) is not supported in a batch.",
                n,
                "body.stream",
            )
            ok = False
        model = body.get("model")
        if not self._model_ok(n, model):
            return False
        self.model = model
        return ok

    def _model_ok(self, n: int, model: Any) -> bool:
        if model is not None and not isinstance(model, str):
            self.error("invalid_type", "'body.model' must be a string.", n, "body.model")
            return False
        if model is not None and "\x00" in model:  # stored in a text column; PostgreSQL refuses NUL
            self.error("invalid_value", "'body.model' must not contain NUL characters.", n, "body.model")
            return False
        return True


class RangeValidator:
    """Validates the lines of one byte range, fed as blocks that end at line boundaries.

    ``on_ids`` receives the custom_id hashes of each block. It stops early (``feed`` returns
    False) when errors reach the cap or the range alone holds more than ``max_lines``.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        chunk_lines: int,
        max_lines: int,
        max_errors: int,
        max_line_bytes: int | None,
        at_file_start: bool,
        on_ids: Callable[[list[int]], None],
    ):
        self.endpoint = endpoint
        self.decode = line_decoder(endpoint).decode
        self.checker = LineChecker(endpoint, max_lines, max_errors)
        self.chunk_lines, self.max_lines, self.max_errors = chunk_lines, max_lines, max_errors
        self.max_line_bytes = max_line_bytes if max_line_bytes is not None else 1 << 62
        self.at_file_start = at_file_start
        self.on_ids = on_ids
        self.res = RangeResult(errors=self.checker.plan.errors)
        self.model: str | None = None
        # The open chunk: first line, byte start, line count, byte end.
        self._c: list[int] | None = None

    def feed(self, block: bytes, offset: int) -> bool:
        """Check the lines of ``block`` (which starts at byte ``offset`` of the file)."""
        if self.at_file_start and block.startswith(BOM):
            block, offset = block[3:], offset + 3  # the BOM is not part of the first line
        self.at_file_start = False
        utf8 = block.isascii() or _is_utf8(block)
        if utf8 and len(block) <= self.max_line_bytes and self._feed_whole(block, offset):
            return True
        return self._feed_lines(block, offset, utf8)

    def _feed_whole(self, block: bytes, offset: int) -> bool:
        """The common case, in C but for a few steps per block: every line of the block
        valid, one model. Each line is decoded on its own (``decode`` refuses a blank line, a
        value split across lines and two values on one line, which ``decode_lines`` would
        accept), and the chunk ends come from the line lengths. On any doubt (an invalid or
        blank line, a new model, the line limit) the caller goes line by line."""
        parts = block.split(b"\n")
        if parts[-1] == b"":
            parts.pop()
        try:
            lines = list(map(self.decode, parts))
        except DECODE_ERRORS:
            return False
        count = len(lines)
        res = self.res
        if not count or res.total + count > self.max_lines:
            return False
        lengths = list(map(len, parts))
        if _may_nest_too_deep(block, lengths):
            return False  # some line might nest too deep: the line path checks exactly
        if self.model is None:  # else ``decode`` took only lines of that model (or none)
            models = set(map(_MODEL, lines))
            models.discard(None)
            if len(models) > 1 or any("\x00" in m for m in models):
                return False
            if models:
                first = next(i for i, line in enumerate(lines) if _MODEL(line) is not None)
                self._saw_model(res.lines + first + 1, models.pop())
        self.on_ids(list(map(xxh3_64_intdigest, map(str.encode, map(_ID, lines)))))
        self._plan_lines(lengths, offset, len(block))
        res.lines += count
        res.total += count
        return True

    def _plan_lines(self, lengths: list[int], offset: int, size: int) -> None:
        """Add lines of these lengths (each followed by a newline, but perhaps the last one
        of the block) to the chunk plan, a chunk at a time."""
        chunk_lines, n, rel, i, count = self.chunk_lines, self.res.lines, 0, 0, len(lengths)
        while i < count:
            c = self._c
            if c is None:
                c = self._c = [n + i + 1, offset + rel, 0, 0]
            take = min(chunk_lines - c[2], count - i)
            rel += sum(lengths[i : i + take]) + take
            c[2] += take
            c[3] = offset + min(rel, size)
            i += take
            if c[2] >= chunk_lines:
                self._close_chunk()

    def _feed_lines(self, block: bytes, offset: int, utf8: bool) -> bool:
        block_end = offset + len(block)
        parts = block.split(b"\n")
        if parts[-1] == b"":
            parts.pop()
        res, decode, model = self.res, self.decode, self.model
        hashes: list[int] = []
        n, total, pos = res.lines, res.total, offset
        try:
            for raw in parts:
                n += 1
                start = pos
                pos = min(pos + len(raw) + 1, block_end)  # the last line may have no newline
                if raw.endswith(b"\r"):
                    raw = raw[:-1]
                try:
                    if len(raw) > self.max_line_bytes or not utf8 or _openers(raw) > MAX_LINE_DEPTH:
                        raise ValueError
                    line = decode(raw)
                    if line.body.model is not None and "\x00" in line.body.model:
                        raise ValueError  # LineChecker says invalid_value
                except (ValueError, *DECODE_ERRORS):
                    res.total = total
                    ok = self._slow(n, raw, hashes, start, pos)
                    total = res.total
                    if not ok:
                        return False
                    model = self.model
                    continue
                total += 1
                if total > self.max_lines:
                    res.total = total
                    return self._too_many()
                hashes.append(id_hash(line.custom_id))
                m = line.body.model
                if m is not None and m != model:
                    self._saw_model(n, m)
                    model = self.model
                self._plan(n, start, pos)
            return not self.checker.full
        finally:
            res.lines, res.total = n, max(total, res.total)
            self.on_ids(hashes)

    def _slow(self, n: int, raw: bytes, hashes: list[int], start: int, end: int) -> bool:
        """A line that is blank, too long or not of the valid shape. False: stop."""
        res = self.res
        if not raw.strip():
            return True  # blank lines are skipped but keep their number
        res.total += 1
        if res.total > self.max_lines:
            return self._too_many()
        self._plan(n, start, end)
        if len(raw) > self.max_line_bytes:
            self.checker.error(
                "line_too_long",
                f"Line {{line}} has more than {self.max_line_bytes} bytes, the most a line may hold "
                "(setting BATCHD_MAX_LINE_BYTES).",
                n,
            )
            return not self.checker.full
        self.checker.check(n, raw)
        if self.checker.custom_id is not None:
            hashes.append(id_hash(self.checker.custom_id))
        if self.checker.model is not None and self.checker.model != self.model:
            self._saw_model(n, self.checker.model)
        return not self.checker.full

    def _too_many(self) -> bool:
        self.res.too_many = True
        return False

    def _saw_model(self, n: int, model: str) -> None:
        lines = self.res.models.setdefault(model, [])
        if self.model is None:
            self.model = model
            self.decode = line_decoder(self.endpoint, model).decode
        if len(lines) <= self.max_errors:
            lines.append(n)

    def _plan(self, n: int, start: int, end: int) -> None:
        c = self._c
        if c is None:
            c = self._c = [n, start, 0, end]
        c[2] += 1
        c[3] = end
        if c[2] >= self.chunk_lines:
            self._close_chunk()

    def _close_chunk(self) -> None:
        c = self._c
        if c is not None:
            self.res.chunks.append(
                {"first_line": c[0], "byte_start": c[1], "line_count": c[2], "byte_end": c[3]}
            )
            self._c = None

    def finish(self) -> RangeResult:
        self._close_chunk()
        return self.res


def _loads(text: bytes) -> Any:
    """orjson, but for a number past a float's range (``1e400``, 400 digits): JSON allows it,
    dispatch sends the body as written, so the standard library reads such a line instead."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        if "infinity" not in str(exc):
            raise
        error = exc
    try:
        # Only the types of a few fields matter here: an integer past Python's digit limit
        # is read as a float rather than refused.
        obj = json.loads(text.decode(), parse_constant=_no_constant, parse_int=float)
        SYNTAX.decode(text)  # as strict as msgspec, which dispatch reads the line with
    except (ValueError, RecursionError, *DECODE_ERRORS):
        raise error from None
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _openers(raw: bytes) -> int:
    return raw.count(b"[") + raw.count(b"{")


def _may_nest_too_deep(block: bytes, lengths: list[int]) -> bool:
    """Whether some line holds more than ``MAX_LINE_DEPTH`` opening brackets (the bound of
    its depth), in numpy: the positions of ``[`` and ``{``, each put on its line by a binary
    search over the line ends, counted per line."""
    data = np.frombuffer(block, np.uint8)
    opens = np.flatnonzero((data == 0x5B) | (data == 0x7B))
    if len(opens) <= MAX_LINE_DEPTH:
        return False
    ends = np.cumsum(np.asarray(lengths) + 1)  # just past each line's newline
    return bool(np.bincount(np.searchsorted(ends, opens, side="right")).max() > MAX_LINE_DEPTH)


def _is_utf8(block: bytes) -> bool:
    try:
        block.decode()
    except UnicodeDecodeError:
        return False
    return True


class IdFinder:
    """(range-local line, custom_id) of the lines whose id hash is in ``wanted``: the pass
    that turns repeated hashes into confirmed duplicates. Fed block by block like
    ``RangeValidator``; keeps at most ``cap`` lines per hash."""

    def __init__(self, wanted: set[int], at_file_start: bool, cap: int):
        self.wanted, self.at_file_start, self.cap = wanted, at_file_start, cap
        self.found: list[tuple[int, str]] = []
        self.per_hash: dict[int, int] = {}
        self.n = 0

    def feed(self, block: bytes) -> None:
        parts = block.split(b"\n")
        if parts[-1] == b"":
            parts.pop()
        if self.at_file_start and parts and parts[0].startswith(BOM):
            parts[0] = parts[0][3:]
        self.at_file_start = False
        n, wanted, per_hash = self.n, self.wanted, self.per_hash
        for raw in parts:
            n += 1
            try:
                cid: str | None = ID_DECODER.decode(raw).custom_id
            except DECODE_ERRORS:
                cid = _slow_id(raw)
            if not cid:
                continue
            h = id_hash(cid)
            if h in wanted and per_hash.get(h, 0) < self.cap:
                per_hash[h] = per_hash.get(h, 0) + 1
                self.found.append((n, cid))
        self.n = n


def _slow_id(raw: bytes) -> str | None:
    try:
        obj = orjson.loads(raw.rstrip(b"\r"))
    except orjson.JSONDecodeError:
        return None
    cid = obj.get("custom_id") if isinstance(obj, dict) else None
    return cid if isinstance(cid, str) else None


# ------------------------------------------------------------------------------ merging


def merge(
    results: list[RangeResult],
    duplicates: list[tuple[int, str]],
    *,
    max_lines: int,
    max_errors: int,
) -> Plan:
    """One plan from the ranges in file order; ``duplicates`` are (global line, custom_id)
    of every occurrence of an id whose hash repeated, in line order."""
    plan = Plan()
    errors: list[dict[str, Any]] = []
    uses: list[tuple[int, str]] = []  # (global line, model): first uses of each model
    base = 0
    for r in results:
        for e in r.errors:
            errors.append({**e, "line": e["line"] + base if e["line"] is not None else None})
        uses.extend((line + base, model) for model, lines in r.models.items() for line in lines)
        for c in r.chunks:
            plan.chunks.append({**c, "idx": len(plan.chunks), "first_line": c["first_line"] + base})
        plan.total += r.total
        base += r.lines
    if uses:
        plan.model = min(uses)[1]
        errors.extend(_model_error(line, m, plan.model) for line, m in uses if m != plan.model)
    errors.extend(_duplicate_errors(duplicates))
    errors.sort(key=lambda e: e["line"] or 0)
    if any(r.too_many for r in results) or plan.total > max_lines:
        errors = errors[: max_errors - 1]
        errors.append(
            {
                "code": "too_many_tasks",
                "message": f"The file has more than {max_lines} requests, the most a batch may hold "
                "(setting BATCHD_MAX_LINES_PER_BATCH).",
                "param": None,
                "line": None,
            }
        )
    for e in errors:
        if e["code"] == "line_too_long":
            e["message"] = e["message"].replace("{line}", str(e["line"]))
    plan.errors = errors[:max_errors]
    if plan.total == 0 and not plan.errors:
        plan.errors.append(
            {
                "code": "empty_file",
                "message": "The input file has no request lines.",
                "param": None,
                "line": None,
            }
        )
    return plan


def _model_error(n: int, model: str, first: str) -> dict[str, Any]:
    return {
        "code": "model_mismatch",
        "message": f"All lines of a batch must use the same model: this line uses '{model[:200]}', "
        f"earlier lines use '{first}'.",
        "param": "body.model",
        "line": n,
    }


def _duplicate_errors(found: list[tuple[int, str]]) -> list[dict[str, Any]]:
    seen: set[str] = set()
    out = []
    for n, cid in sorted(found):
        if cid in seen:
            out.append(
                {
                    "code": "duplicate_custom_id",
                    "message": f"The custom_id '{cid[:200]}' appears more than once.",
                    "param": "custom_id",
                    "line": n,
                }
            )
        seen.add(cid)
    return out


# ------------------------------------------------------------------- one process, async


async def blocks_of(
    blobs: BlobStore, key: str, start: int = 0, end: int | None = None, max_line: int | None = None
) -> AsyncIterator[tuple[bytes, int]]:
    """(block, offset) over a stored object: blocks of about ``BLOCK_BYTES`` that end at a
    line boundary (the last one at the end of the range). A local file is read by
    ``file_blocks`` (positioned reads, one copy), a block at a time on a thread."""
    path = blobs.local_path(key)
    if path is not None:
        try:
            size = path.stat().st_size
        except FileNotFoundError as exc:
            raise BlobMissing(f"missing object {key}") from exc
        blocks = file_blocks(path, start, size if end is None else min(end, size), max_line)
        try:
            while (item := await asyncio.to_thread(next, blocks, None)) is not None:
                yield item
        finally:
            blocks.close()  # a caller that stops early: the file closes now, not at GC
        return
    cutter = _Cutter(start, max_line)
    async for piece in blobs.stream(key, start, end):
        for item in cutter.push(piece):
            yield item
    for item in cutter.rest():
        yield item


def file_blocks(
    path: Path, start: int, end: int, max_line: int | None = None
) -> Generator[tuple[bytes, int], None, None]:
    """``blocks_of`` for a local file, synchronously (for worker processes). Each block is
    one positioned read cut after its last newline; the next read starts there, so the only
    copy is that cut. From a line longer than a block on, ``_Cutter`` takes over."""
    with open(path, "rb", buffering=0) as f:
        fd, at = f.fileno(), start
        while at < end:
            piece = os.pread(fd, min(BLOCK_BYTES, end - at), at)
            if not piece:
                return
            if at + len(piece) < end:
                cut = piece.rfind(b"\n") + 1
                if cut == 0:
                    yield from _cut_file(f, at, end, max_line)
                    return
                if cut < len(piece):
                    piece = piece[:cut]
            yield piece, at
            at += len(piece)


def _cut_file(f: BinaryIO, start: int, end: int, max_line: int | None) -> Iterator[tuple[bytes, int]]:
    cutter = _Cutter(start, max_line)
    f.seek(start)
    left = end - start
    while left > 0:
        piece = f.read(min(4 * BLOCK_BYTES, left))
        if not piece:
            break
        left -= len(piece)
        yield from cutter.push(piece)
    yield from cutter.rest()


class _Cutter:
    """Cuts a stream of pieces into blocks of about ``BLOCK_BYTES`` that end at a newline.

    With ``max_line``, a longer line is cut to ``max_line + 1`` bytes while it is read and
    yielded as a block of its own (the next block's offset stays true): a 100 MB line is
    reported as too long without ever being held whole."""

    def __init__(self, at: int, max_line: int | None = None):
        self.at = at
        self.carry = b""
        self.max_line = max_line
        self.skipped = 0  # bytes of the current over-long line dropped so far

    def push(self, piece: bytes) -> Iterator[tuple[bytes, int]]:
        if self.skipped:
            nl = piece.find(b"\n")
            if nl < 0:
                self.skipped += len(piece)
                return
            yield self.carry + b"\n", self.at
            self.at += len(self.carry) + self.skipped + nl + 1
            self.carry, self.skipped = b"", 0
            piece = piece[nl + 1 :]
        data = self.carry + piece if self.carry else piece
        pos = 0
        while len(data) - pos >= BLOCK_BYTES:
            cut = data.rfind(b"\n", pos, pos + BLOCK_BYTES) + 1
            if cut == 0:
                cut = data.find(b"\n", pos + BLOCK_BYTES) + 1  # a line longer than a block
                if cut == 0:
                    break
            yield data[pos:cut], self.at
            self.at += cut - pos
            pos = cut
        self.carry = data[pos:]
        limit = self.max_line
        if limit is not None and len(self.carry) > limit + 1 and b"\n" not in self.carry:
            self.skipped = len(self.carry) - (limit + 1)
            self.carry = self.carry[: limit + 1]

    def rest(self) -> Iterator[tuple[bytes, int]]:
        if self.carry:
            yield self.carry, self.at
            self.at += len(self.carry)
            self.carry = b""


async def validate_file(
    blobs: BlobStore,
    key: str,
    *,
    endpoint: str,
    chunk_lines: int,
    max_lines: int,
    max_errors: int,
    max_line_bytes: int | None = None,
    id_bound: int = DEFAULT_ID_BOUND,
    spill_dir: Path | None = None,
) -> Plan:
    """Validate in this process, one block at a time, yielding to the event loop between
    blocks (a block takes a few milliseconds). Big files go to ``parallel.validate_parallel``."""
    ids = IdSet(id_bound, spill_dir)
    try:
        checker = RangeValidator(
            endpoint,
            chunk_lines=chunk_lines,
            max_lines=max_lines,
            max_errors=max_errors,
            max_line_bytes=max_line_bytes,
            at_file_start=True,
            on_ids=ids.add_many,
        )
        async for block, offset in blocks_of(blobs, key, max_line=max_line_bytes):
            if not checker.feed(block, offset):
                break
            await asyncio.sleep(0)
        result = checker.finish()
        repeated = await asyncio.to_thread(ids.finish)
    finally:
        ids.close()
    finder = IdFinder(repeated, at_file_start=True, cap=max_errors + 1)
    if repeated:
        async for block, _ in blocks_of(blobs, key, max_line=max_line_bytes):
            finder.feed(block)
            await asyncio.sleep(0)
    duplicates = finder.found
    return merge([result], duplicates, max_lines=max_lines, max_errors=max_errors)
