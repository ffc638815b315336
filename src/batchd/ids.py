"""Object ids in OpenAI's shapes: ``file-`` + base62, ``batch_`` + hex, ``batch_req_`` + hex."""

from __future__ import annotations

import itertools
import secrets
import string

_B62 = string.ascii_letters + string.digits


def file_id() -> str:
    return "file-" + "".join(secrets.choice(_B62) for _ in range(22))


def batch_id() -> str:
    return "batch_" + secrets.token_hex(16)


# Per-line ids are made on the hot path: a random per-process prefix and a counter are unique
# across processes and cost no system call (secrets.token_hex reads os.urandom every time).
_PREFIX = secrets.token_hex(8)
_counter = itertools.count(secrets.randbelow(1 << 32))


def request_line_id() -> str:
    return f"batch_req_{_PREFIX}{next(_counter) & 0xFFFFFFFFFFFFFFFF:016x}"


def request_id() -> str:
    return f"req_{_PREFIX}{next(_counter) & 0xFFFFFFFFFFFFFFFF:016x}"


def worker_id() -> str:
    return "wkr_" + secrets.token_hex(8)


def upload_id() -> str:
    return "upload_" + secrets.token_hex(12)


def part_id() -> str:
    return "part_" + secrets.token_hex(12)
