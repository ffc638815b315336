"""A worker's identity, kept across restarts of the same process slot.

Leases name their owner. A process that was killed leaves leases that nobody renews; another
worker may take them over once they run out, but the process's own next start should not wait:
it knows they are its own. So a worker with a data directory takes a stable id from
``<data_dir>/worker.id`` under an exclusive ``flock`` (so two live processes never share it),
and at start it recovers and releases whatever that id still holds. A second process on the
same directory finds the lock taken and uses a fresh id.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

from batchd.ids import worker_id


class WorkerIdentity:
    def __init__(self, owner: str, stable: bool, lock: IO[str] | None):
        self.owner = owner
        self.stable = stable
        self._lock = lock

    @classmethod
    def claim(cls, data_dir: Path) -> WorkerIdentity:
        data_dir.mkdir(parents=True, exist_ok=True)
        for slot in range(64):
            path = data_dir / ("worker.id" if slot == 0 else f"worker-{slot}.id")
            handle = open(path, "a+")  # noqa: SIM115 - held open for the process lifetime
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            handle.seek(0)
            owner = handle.read().strip()
            if not owner:
                owner = worker_id()
                handle.write(owner)
                handle.flush()
                os.fsync(handle.fileno())
            return cls(owner, True, handle)
        return cls(worker_id(), False, None)

    @classmethod
    def ephemeral(cls) -> WorkerIdentity:
        return cls(worker_id(), False, None)

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None
