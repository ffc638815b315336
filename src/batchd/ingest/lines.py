"""Splitting stored JSONL into lines, the same way for validation and for dispatch.

A line is what lies between two ``\\n``. A trailing ``\\r`` is dropped (CRLF files), a UTF-8
BOM at the very start of the file is dropped, and blank lines are skipped but still counted,
so line numbers match what an editor shows.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

from batchd.blobs import BlobStore

BOM = b"\xef\xbb\xbf"


def clean(raw: bytes, at_file_start: bool) -> bytes | None:
    """The line's JSON text, or None for a blank line."""
    if at_file_start and raw.startswith(BOM):
        raw = raw[3:]
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    if not raw.strip():
        return None
    return raw


def split_block(block: bytes, offset: int) -> Iterator[tuple[int, int, bytes]]:
    """Lines of a block that is known to end at a line boundary: (start, end, raw)."""
    pos = 0
    size = len(block)
    while pos < size:
        nl = block.find(b"\n", pos)
        end = size if nl < 0 else nl + 1
        yield offset + pos, offset + end, block[pos : end - 1 if nl >= 0 else end]
        pos = end


async def iter_lines(
    blobs: BlobStore, key: str, start: int = 0, end: int | None = None, max_line: int | None = None
) -> AsyncIterator[tuple[int, int, bytes]]:
    """Stream (byte_start, byte_end, raw_line) over a stored object without loading it.

    With ``max_line``, a longer line is yielded cut to ``max_line + 1`` bytes (its offsets are
    still true): a 100 MB line is reported as too long without ever being held whole."""
    carry = b""
    carry_at = start
    skipped = 0  # bytes of the current over-long line dropped from ``carry``
    async for piece in blobs.stream(key, start, end):
        data = carry + piece if carry else piece
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            carry = data
            if max_line is not None and len(carry) > max_line + 1:
                skipped += len(carry) - (max_line + 1)
                carry = carry[: max_line + 1]
            continue
        offset = carry_at
        if skipped:
            nl = data.find(b"\n")
            yield offset, offset + skipped + nl + 1, data[: min(nl, len(carry))]
            offset += skipped + nl + 1
            data, cut, skipped = data[nl + 1 :], cut - nl - 1, 0
        for item in split_block(data[:cut], offset):
            yield item
        carry = data[cut:]
        carry_at = offset + cut
    if carry:
        yield carry_at, carry_at + skipped + len(carry), carry
