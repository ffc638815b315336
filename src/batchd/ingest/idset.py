"""The custom_id duplicate check in bounded memory, for files of millions of lines.

Ids are kept as 64-bit hashes (xxh3 of the UTF-8 bytes: stable across processes, so range
validators in separate processes agree). A writer holds up to ``bound`` hashes in an array;
each time it fills, the array is sorted (numpy, in C) and written out as a *run*. The check
then reads the runs back one slice of the hash space at a time: every run is sorted, so a
slice is one contiguous stretch of each file, found by binary search on a memory map. Each
slice is sorted and its equal neighbours are the repeats. Memory holds about ``bound`` hashes
at any moment, never all of them, and no step touches a hash from Python.

The result is the set of hashes seen more than once; a caller confirms each one against the
actual ids (two ids may share a hash), so a collision never fails a batch.
"""

from __future__ import annotations

import shutil
import tempfile
from array import array
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import xxhash

SPACE = 1 << 64  # the hash space; slices of it split the check between processes
_RUNS = "run-*.u64"


def id_hash(custom_id: str) -> int:
    return xxhash.xxh3_64_intdigest(custom_id.encode())


class RunWriter:
    """Hashes to sorted run files under ``root`` (named with ``tag``, so that several
    processes can write side by side), ``bound`` hashes per run at most."""

    def __init__(self, root: Path, tag: str, bound: int):
        self.root, self.tag, self.bound = root, tag, max(bound, 1)
        self.buf = array("Q")
        self.runs = 0

    def add_many(self, hashes: Iterable[int]) -> None:
        self.buf.extend(hashes)
        if len(self.buf) >= self.bound:
            self.close()

    def close(self) -> None:
        """Write what is buffered as a run (the writer stays usable)."""
        if self.buf:
            _write_run(self.buf, self.root / f"run-{self.tag}-{self.runs:05d}.u64")
            self.runs += 1
            self.buf = array("Q")


def _write_run(buf: array[int], path: Path) -> None:
    run = np.frombuffer(buf, dtype=np.uint64)
    run.sort()
    run.tofile(path)


def _repeats_of(hashes: np.ndarray, cap: int) -> list[int]:
    """Values that occur more than once in ``hashes`` (sorted in place), at most ``cap``."""
    hashes.sort()
    same = hashes[1:][hashes[1:] == hashes[:-1]]
    return [int(h) for h in np.unique(same)[:cap]]


def repeated_in_runs(files: list[Path], bound: int, cap: int, lo: int = 0, hi: int = SPACE) -> set[int]:
    """Hashes in ``[lo, hi)`` that occur more than once across the sorted runs ``files``,
    at most ``cap``, checked in slices of about ``bound`` hashes."""
    runs = [np.memmap(f, dtype=np.uint64, mode="r") for f in files if f.stat().st_size]
    if not runs or cap <= 0:
        return set()

    def cut(value: int) -> list[int]:
        if value >= SPACE:
            return [len(r) for r in runs]
        return [int(np.searchsorted(r, np.uint64(value))) for r in runs]

    start = cut(lo)
    inside = sum(cut(hi)) - sum(start)
    slices = max(1, -(-inside // max(bound, 1)))
    out: set[int] = set()
    for k in range(slices):
        end = cut(lo + (hi - lo) * (k + 1) // slices)
        part = np.concatenate([r[a:b] for r, a, b in zip(runs, start, end, strict=True)])
        out.update(_repeats_of(part, cap - len(out)))
        if len(out) >= cap:
            break
        start = end
    return out


def run_files(root: Path) -> list[Path]:
    return sorted(root.glob(_RUNS))


class IdSet:
    """custom_id hashes of one validation run in this process: in memory up to ``bound``,
    then in sorted runs on disk under a directory of ``spill_dir``."""

    def __init__(self, bound: int, spill_dir: Path | None = None, cap: int = 100_000):
        self.bound, self.cap = bound, cap
        self.mem = array("Q")
        self._spill_parent = spill_dir
        self._writer: RunWriter | None = None

    @property
    def spilled(self) -> bool:
        return self._writer is not None

    def add_many(self, hashes: Iterable[int]) -> None:
        self.mem.extend(hashes)
        if len(self.mem) >= self.bound:
            self._spill()

    def _spill(self) -> None:
        if self._writer is None:
            root = Path(tempfile.mkdtemp(prefix="batchd-ids-", dir=self._spill_parent))
            self._writer = RunWriter(root, "0", self.bound)
        self._writer.add_many(self.mem)
        self._writer.close()
        self.mem = array("Q")

    def finish(self) -> set[int]:
        """Every hash seen more than once (at most ``cap``)."""
        if self._writer is None:
            return set(_repeats_of(np.frombuffer(self.mem, dtype=np.uint64).copy(), self.cap))
        self._spill()
        return repeated_in_runs(run_files(self._writer.root), self.bound, self.cap)

    def close(self) -> None:
        if self._writer is not None:
            shutil.rmtree(self._writer.root, ignore_errors=True)
