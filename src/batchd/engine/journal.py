"""The per-chunk result journal: every result is on disk the moment it arrives.

Checkpoints (result parts) are written every N lines or T seconds; between two of them, results
live in memory. To lose none of them to ``kill -9``, each result is also appended to a local
journal file, one ``write`` per result (the kernel keeps it even if the process dies; fsync is
left to the checkpoint). When the same worker identity starts again, it commits what its
journals hold that no part has recorded yet, so the only requests a crash repeats are the ones
that were still waiting for the upstream's answer.

Record: ``<line index> <kind> <output line JSON>\\n`` with kind ``o`` (output), ``h`` (error
file, HTTP error: counts as failed) or ``e`` (error file, no HTTP answer). A torn last record
is ignored.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from batchd.engine.results import NO_USAGE, LineResult, usage_of

_NAME = re.compile(r"^(?P<batch>[A-Za-z0-9_-]+)\.(?P<idx>\d+)\.(?P<gen>\d+)\.journal$")


@dataclass(frozen=True)
class JournalKey:
    batch_id: str
    idx: int
    generation: int

    @property
    def filename(self) -> str:
        return f"{self.batch_id}.{self.idx}.{self.generation}.journal"


class Journal:
    """Append-only and unbuffered across event-loop turns: the results of one turn of the loop
    go out in one ``write`` at the end of that turn (a turn lasts microseconds and never
    includes waiting for the upstream), so a kill loses only answers that arrived in the
    very turn it struck, which are then sent again like requests still in flight."""

    def __init__(self, path: Path):
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._records: list[bytes] = []

    def append(self, idx: int, result: LineResult) -> None:
        kind = b"o" if result.ok else (b"h" if result.http_error else b"e")
        if not self._records:
            asyncio.get_running_loop().call_soon(self.flush)
        self._records.append(b"%d %s %s" % (idx, kind, result.line))

    def flush(self) -> None:
        if self._records and self._fd >= 0:
            os.write(self._fd, b"".join(self._records))
        self._records.clear()

    def close(self, remove: bool) -> None:
        if self._fd >= 0:
            if not remove:
                self.flush()
            os.close(self._fd)
            self._fd = -1
        self._records.clear()
        if remove:
            self.path.unlink(missing_ok=True)


class JournalDir:
    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def open(self, key: JournalKey) -> Journal:
        return Journal(self.root / key.filename)

    def leftovers(self) -> Iterator[tuple[JournalKey, Path]]:
        for path in sorted(self.root.glob("*.journal")):
            m = _NAME.match(path.name)
            if m:
                yield JournalKey(m["batch"], int(m["idx"]), int(m["gen"])), path


def read_journal(path: Path) -> Iterator[tuple[int, LineResult]]:
    """Complete records of a journal, in order."""
    data = path.read_bytes()
    for record in data.split(b"\n")[:-1]:  # the piece after the last newline is torn or empty
        try:
            idx_text, kind, line = record.split(b" ", 2)
            idx = int(idx_text)
            if kind == b"o":
                body = orjson.loads(line)["response"]["body"]
                yield idx, LineResult(True, line + b"\n", usage_of(body))
            else:
                yield idx, LineResult(False, line + b"\n", NO_USAGE, http_error=kind == b"h")
        except (ValueError, KeyError, TypeError, orjson.JSONDecodeError):
            continue
