"""The command line as a user runs it."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path


def batchd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "batchd", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_help_lists_commands() -> None:
    out = batchd("--help")
    assert out.returncode == 0
    for command in ("serve", "migrate", "fake-upstream"):
        assert command in out.stdout


def test_bad_settings_exit_2_with_a_message() -> None:
    out = batchd("serve", "--completion-windows", "24h,forever")
    assert out.returncode == 2
    assert "BATCHD_COMPLETION_WINDOWS" in out.stderr and "forever" in out.stderr
    out = batchd("serve", env={"BATCHD_PORT": "eighty"})
    assert out.returncode == 2 and "BATCHD_PORT" in out.stderr


def test_migrate_creates_the_schema(tmp_path: Path) -> None:
    out = batchd("migrate", "--data-dir", str(tmp_path / "d"))
    assert out.returncode == 0, out.stderr
    with sqlite3.connect(tmp_path / "d" / "batchd.sqlite3") as db:
        tables = {r[0] for r in db.execute("select name from sqlite_master where type='table'")}
    assert {"files", "batches", "chunks", "result_parts", "alembic_version"} <= tables
