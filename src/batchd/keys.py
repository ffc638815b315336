"""API keys: generated here, stored only as a sha256 hash, looked up with a short cache."""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
import string
import time
from dataclasses import dataclass
from typing import Any

from batchd.store import Store

ALPHABET = string.ascii_letters + string.digits
CACHE_SECONDS = 1.0  # revocation takes effect within this long (plus one request)


def new_secret() -> str:
    return "bd-" + "".join(secrets.choice(ALPHABET) for _ in range(40))


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def create_key(
    store: Store, project: str, *, admin: bool, name: str | None = None
) -> tuple[str, dict[str, Any]]:
    """A new key: the secret (shown once) and its stored row (which holds only the hash)."""
    secret = new_secret()
    row = await store.create_api_key(
        id="key_" + secrets.token_hex(12),
        project=project,
        name=name,
        key_hash=hash_key(secret),
        prefix=secret[:7],
        is_admin=admin,
        created_at=int(time.time()),
    )
    return secret, row


@dataclass(frozen=True)
class Principal:
    project: str
    is_admin: bool
    key_id: str | None  # None in open mode


class KeyCache:
    """Key lookups cached for ``CACHE_SECONDS``: the table is read on every request."""

    def __init__(self, store: Store, ttl: float = CACHE_SECONDS):
        self.store, self.ttl = store, ttl
        self._keys: dict[str, tuple[float, dict[str, Any] | None]] = {}
        self._live: tuple[float, int] = (0.0, 0)

    async def live_keys(self) -> int:
        at, n = self._live
        if time.monotonic() - at > self.ttl:
            n = await self.store.count_live_api_keys()
            self._live = (time.monotonic(), n)
        return n

    async def lookup(self, secret: str) -> dict[str, Any] | None:
        """The live key row for ``secret``, or None (unknown or revoked)."""
        h = hash_key(secret)
        hit = self._keys.get(h)
        if hit is None or time.monotonic() - hit[0] > self.ttl:
            row = await self.store.find_api_key(h)
            if len(self._keys) > 10_000:
                self._keys.clear()
            hit = (time.monotonic(), row)
            self._keys[h] = hit
        row = hit[1]
        return row if row is not None and row["revoked_at"] is None else None
