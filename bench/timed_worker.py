"""``batchd worker`` with a stopwatch on its database and blob calls (bench/scaleout.py).

Wraps the Store and BlobStore methods a worker calls per lease and per checkpoint, and on exit
writes {method: [calls, seconds]} as JSON to ``$BATCHD_BENCH_TIMINGS``. Kept out of src/: the
product has no timing hooks to pay for.
"""

from __future__ import annotations

import atexit
import functools
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from batchd.blobs.store import BlobStore
from batchd.cli import app
from batchd.store.store import Store

TALLY: dict[str, list[float]] = {}


def _timed(cls: Any, name: str) -> None:
    original: Callable[..., Awaitable[Any]] = getattr(cls, name)

    @functools.wraps(original)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return await original(*args, **kwargs)
        finally:
            entry = TALLY.setdefault(f"{cls.__name__}.{name}", [0, 0.0])
            entry[0] += 1
            entry[1] += time.perf_counter() - start

    setattr(cls, name, wrapper)


for _name in ("lease_chunks", "commit_part", "heartbeat", "active_workers", "done_bitmaps"):
    _timed(Store, _name)
_timed(BlobStore, "put_durable")


@atexit.register
def _dump() -> None:
    path = os.environ.get("BATCHD_BENCH_TIMINGS")
    if path:
        with open(path, "wb") as f:
            f.write(orjson.dumps(TALLY))


if __name__ == "__main__":
    app(["worker"])
