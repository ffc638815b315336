"""Re-run input: the original lines of the requests that a finished batch did not complete.

Both files are streamed; what is held in memory is the set of custom_ids in the error file
(one string per line that failed, expired or was cancelled), never a file.
"""

from __future__ import annotations

from collections.abc import Sequence

import orjson

from batchd.blobs import BlobStore, BlobWriter
from batchd.ingest.lines import clean, iter_lines
from batchd.ingest.lineshape import custom_id_of


async def error_custom_ids(blobs: BlobStore, pieces: Sequence[tuple[str, int]]) -> set[str]:
    """The custom_ids of an error file (a view over result part blobs)."""
    ids: set[str] = set()
    for key, size in pieces:
        if not size:
            continue
        async for _start, _end, raw in iter_lines(blobs, key):
            if raw.strip():
                custom_id = orjson.loads(raw).get("custom_id")
                if isinstance(custom_id, str):
                    ids.add(custom_id)
    return ids


async def copy_lines(blobs: BlobStore, input_key: str, ids: set[str], writer: BlobWriter) -> int:
    """Write the input lines whose custom_id is in ``ids`` (each once, in input order);
    returns how many were written."""
    written = 0
    left = set(ids)
    async for start, _end, raw in iter_lines(blobs, input_key):
        text = clean(raw, start == 0)
        if text is None:
            continue
        custom_id = custom_id_of(text)
        if custom_id in left:
            left.discard(custom_id)
            await writer.write(text + b"\n")
            written += 1
            if not left:
                break
    return written
