"""The batch object's ``lines_per_second`` and ``eta`` extension fields.

The rate is measured over a recent window, not since ``in_progress_at``: a batch that waited
behind others, was paused, or slowed down on 429s would otherwise show a rate it no longer
has. Every result part records when it was committed; the rate is the lines committed in the
last ``WINDOW`` seconds (or since ``in_progress_at``, when that is more recent) divided by
that span. The ETA is now plus the lines not yet counted (``total - completed - failed``) at
that rate. Both are null unless the batch is ``in_progress``; a paused batch shows a rate of
0 and no ETA. One grouped query serves a whole list page.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from batchd import protocol as p
from batchd.api.presenters import batch_object
from batchd.store import Store
from batchd.store.store import Row

WINDOW = 60.0
MIN_SPAN = 1.0  # a batch a moment into its run: don't divide by a sliver of a second


def rate_and_eta(row: Row, recent_lines: int, now: float) -> tuple[float | None, int | None]:
    if row["status"] != "in_progress":
        return None, None
    if row.get("paused_at") is not None:
        return 0.0, None
    started = row["in_progress_at"] or now
    span = max(MIN_SPAN, min(WINDOW, now - started))
    rate = recent_lines / span
    left = max(0, row["total"] - row["completed"] - row["failed"])
    if left == 0:
        return round(rate, 3), int(now)
    if rate <= 0:
        return 0.0, None
    return round(rate, 3), int(now + left / rate + 0.999)


async def present(store: Store, rows: Sequence[Row]) -> list[p.Batch]:
    """Batch objects with their progress extension fields."""
    now = time.time()
    running = [r["id"] for r in rows if r["status"] == "in_progress" and r.get("paused_at") is None]
    recent = await store.recent_lines(running, now - WINDOW)
    return [batch_object(r, *rate_and_eta(r, recent.get(r["id"], 0), now)) for r in rows]
