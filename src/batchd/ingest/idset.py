"""The custom_id duplicate check in bounded memory, for files of millions of lines.

Ids are kept as 64-bit hashes (xxh3 of the UTF-8 bytes: stable across processes, so range
validators in separate processes agree). Up to ``bound`` hashes live in a set; past that
they spill to disk in ``PARTITIONS`` files by their low bits, and the end of the run checks
one partition at a time (splitting again any partition still larger than ``bound``). The
result is the set of hashes seen more than once; a caller confirms each one against the
actual ids (two ids may share a hash), so a collision never fails a batch.
"""

from __future__ import annotations

import shutil
import tempfile
from array import array
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import xxhash

PARTITIONS = 64
_BITS = 6  # log2(PARTITIONS)
_FLUSH = 8192  # hashes buffered per partition before an append to its file


def id_hash(custom_id: str) -> int:
    return xxhash.xxh3_64_intdigest(custom_id.encode())


class PartitionWriter:
    """Appends hashes to ``PARTITIONS`` files under ``root`` (named with ``tag`` so several
    processes can write side by side)."""

    def __init__(self, root: Path, tag: str, level: int = 0):
        self.root, self.tag, self.shift = root, tag, level * _BITS
        self.buffers = [array("Q") for _ in range(PARTITIONS)]
        self.count = 0

    def add_many(self, hashes: Iterable[int]) -> None:
        buffers, shift, mask = self.buffers, self.shift, PARTITIONS - 1
        if shift:
            for h in hashes:
                buffers[(h >> shift) & mask].append(h)
        else:
            for h in hashes:
                buffers[h & mask].append(h)
        for p, buf in enumerate(buffers):
            if len(buf) >= _FLUSH:
                self._flush(buf, p)

    def _flush(self, buf: array[int], p: int) -> None:
        self.count += len(buf)
        with open(self.root / f"p{p:02d}-{self.tag}.bin", "ab") as f:
            buf.tofile(f)
        del buf[:]

    def close(self) -> None:
        """Flush every buffer (the writer stays usable)."""
        for p, buf in enumerate(self.buffers):
            if buf:
                self._flush(buf, p)


def repeated_in_partition(files: list[Path], bound: int, cap: int, level: int = 0) -> set[int]:
    """Hashes that occur more than once across ``files`` (one partition), at most ``cap``."""
    total = sum(f.stat().st_size for f in files) // 8
    if total > bound and level < 9:
        return _split_and_check(files, bound, cap, level + 1)
    seen: set[int] = set()
    repeated: set[int] = set()
    for f in files:
        arr = array("Q")
        with open(f, "rb") as fh:
            arr.frombytes(fh.read())
        merge(seen, arr, repeated)
        if len(repeated) >= cap:
            break
    return set(list(repeated)[:cap])


def merge(seen: set[int], hashes: Sequence[int], repeated: set[int]) -> None:
    """Add ``hashes`` to ``seen``; every one already there or repeated within goes to
    ``repeated``. All set operations: C speed; the Counter runs only when a repeat exists."""
    new = set(hashes)
    if len(new) < len(hashes):
        repeated.update(h for h, c in Counter(hashes).items() if c > 1)
    if not seen.isdisjoint(new):
        repeated.update(seen & new)
    seen |= new


def _split_and_check(files: list[Path], bound: int, cap: int, level: int) -> set[int]:
    sub = Path(tempfile.mkdtemp(dir=files[0].parent, prefix=f"split{level}-"))
    try:
        writer = PartitionWriter(sub, "s", level)
        for f in files:
            arr = array("Q")
            with open(f, "rb") as fh:
                arr.frombytes(fh.read())
            writer.add_many(arr)
        writer.close()
        return repeated_in_dir(sub, bound, cap, level)
    finally:
        shutil.rmtree(sub, ignore_errors=True)


def partition_files(root: Path) -> dict[int, list[Path]]:
    parts: dict[int, list[Path]] = {}
    for f in sorted(root.glob("p*-*.bin")):
        parts.setdefault(int(f.name[1:3]), []).append(f)
    return parts


def repeated_in_dir(
    root: Path, bound: int, cap: int, level: int = 0, only: Iterable[int] | None = None
) -> set[int]:
    """Repeated hashes over every partition under ``root`` (or the partitions ``only``)."""
    out: set[int] = set()
    parts = partition_files(root)
    for p in sorted(parts) if only is None else [p for p in only if p in parts]:
        out |= repeated_in_partition(parts[p], bound, cap - len(out), level)
        if len(out) >= cap:
            break
    return out


class IdSet:
    """custom_id hashes of one validation run: in memory up to ``bound``, then on disk."""

    def __init__(self, bound: int, spill_dir: Path | None = None, cap: int = 100_000):
        self.bound, self.cap = bound, cap
        self.mem: set[int] = set()
        self.repeated: set[int] = set()
        self._spill_parent = spill_dir
        self._root: Path | None = None
        self._writer: PartitionWriter | None = None

    @property
    def spilled(self) -> bool:
        return self._writer is not None

    def add_many(self, hashes: list[int]) -> None:
        merge(self.mem, hashes, self.repeated)
        if len(self.mem) >= self.bound:
            self._spill()

    def _spill(self) -> None:
        if self._writer is None:
            self._root = Path(tempfile.mkdtemp(prefix="batchd-ids-", dir=self._spill_parent))
            self._writer = PartitionWriter(self._root, "0")
        self._writer.add_many(self.mem)
        self._writer.close()  # flush: what left memory is on disk
        self.mem = set()

    def finish(self) -> set[int]:
        """Every hash seen more than once (at most ``cap``, plus those found in memory)."""
        if self._writer is None:
            return self.repeated
        assert self._root is not None
        self._spill()
        self._writer.close()
        return self.repeated | repeated_in_dir(self._root, self.bound, self.cap)

    def close(self) -> None:
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
