"""Object ids in OpenAI's shapes: ``file-`` + base62, ``batch_`` + hex, ``batch_req_`` + hex."""

from __future__ import annotations

import secrets
import string

_B62 = string.ascii_letters + string.digits


def file_id() -> str:
    return "file-" + "".join(secrets.choice(_B62) for _ in range(22))


def batch_id() -> str:
    return "batch_" + secrets.token_hex(16)


def request_line_id() -> str:
    return "batch_req_" + secrets.token_hex(16)


def request_id() -> str:
    return "req_" + secrets.token_hex(16)


def worker_id() -> str:
    return "wkr_" + secrets.token_hex(8)
