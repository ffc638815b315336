"""Helpers for driving the ``batchd`` command line as a user would: a subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from tests.support import assert_schema, jsonl, request_line

ANSI = re.compile(r"\x1b\[")
PLAIN_LINE = re.compile(
    r"batch_\w+: (validating|in_progress|finalizing) \d+/\d+ done, \d+ failed, \d+ lines/s"
)


def batchd(
    *args: str | Path, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "batchd", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, "BATCHD_PROGRESS_INTERVAL": "0.2", **(env or {})},
    )


def write_input(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_bytes(jsonl(lines))
    return path


def chat_lines(n: int, **body: Any) -> list[dict[str, Any]]:
    return [request_line(i, **body) for i in range(n)]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def assert_results(path: Path, custom_ids: set[str], *, errors: bool = False) -> list[dict[str, Any]]:
    """Every line is an OpenAI batch output line, and ``custom_ids`` appear exactly once."""
    rows = read_jsonl(path)
    for row in rows:
        assert_schema("BatchRequestOutput", row)
        assert (row["error"] is not None or row["response"]["status_code"] >= 400) == errors, row
    seen = Counter(r["custom_id"] for r in rows)
    assert set(seen) == custom_ids, sorted(set(seen) ^ custom_ids)[:5]
    assert max(seen.values(), default=1) == 1, [k for k, v in seen.items() if v > 1][:5]
    return rows
