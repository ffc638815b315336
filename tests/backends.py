"""The back ends the suite runs against: SQLite + local directory, and PostgreSQL + S3.

PostgreSQL is the machine's (``BATCHD_TEST_PG``, default ``postgresql://postgres@127.0.0.1:5432``);
each test gets a fresh database. S3 is a ``moto_server`` started once per test session on a free
port; each test gets its own prefix in one bucket. ``BATCHD_TEST_BACKENDS`` (``sqlite,pg``
by default) chooses which run.
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from tests.support import free_port, wait_until

PG_ADMIN = os.environ.get("BATCHD_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
BUCKET = "batchd-test"


def enabled() -> list[str]:
    """``BATCHD_TEST_BACKENDS`` when set (CI sets ``sqlite,pg``, so a missing PostgreSQL fails
    loudly there); otherwise both when PostgreSQL answers, else SQLite alone."""
    given = os.environ.get("BATCHD_TEST_BACKENDS")
    if given:
        return [b.strip() for b in given.split(",") if b.strip()]
    return ["sqlite", "pg"] if _pg_reachable() else ["sqlite"]


@functools.cache
def _pg_reachable() -> bool:
    if shutil.which("psql") is None:
        return False
    probe = subprocess.run(
        ["psql", PG_ADMIN + "/postgres", "-q", "-c", "select 1"], capture_output=True, timeout=10
    )
    return probe.returncode == 0


def _psql(sql: str) -> None:
    subprocess.run(
        ["psql", PG_ADMIN + "/postgres", "-v", "ON_ERROR_STOP=1", "-q", "-c", sql],
        check=True,
        capture_output=True,
        timeout=60,
    )


@contextmanager
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    name = "batchd_t_" + secrets.token_hex(6)
    _psql(f"CREATE DATABASE {name}")
    try:
        yield f"{PG_ADMIN}/{name}"
    finally:
        _psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@dataclass
class S3Server:
    endpoint: str
    proc: subprocess.Popen[bytes]
    env: dict[str, str] = field(default_factory=dict)

    def url(self) -> str:
        return f"s3://{BUCKET}/{secrets.token_hex(6)}"


@contextmanager
def s3_server() -> Iterator[S3Server]:
    """``moto_server`` on loopback with one bucket, for the whole session."""
    port = free_port()
    exe = shutil.which("moto_server") or os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    endpoint = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            with urllib.request.urlopen(endpoint + "/moto-api/", timeout=1):
                return True
        except OSError:
            return False

    try:
        wait_until(up, 30, what="moto_server")
        env = {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
        }
        req = urllib.request.Request(f"{endpoint}/{BUCKET}", method="PUT")
        urllib.request.urlopen(req, timeout=10).close()
        yield S3Server(endpoint, proc, env)
    finally:
        proc.terminate()
        proc.wait(10)
