"""A thin seam over obstore so callers never see which object store holds the bytes.

Writes are streamed and atomic (obstore publishes an object only when its writer closes),
reads are streamed or ranged. obstore's errors become ``StorageError`` here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import obstore
from obstore.exceptions import NotFoundError
from obstore.store import LocalStore, S3Store

from batchd.errors import BlobMissing, StorageError

READ_CHUNK = 1024 * 1024


class BlobWriter:
    """Streams bytes into one object, counting them and hashing them on the way."""

    def __init__(self, store: BlobStore, key: str):
        self.key = key
        self.size = 0
        self._sha = hashlib.sha256()
        self._file = obstore.open_writer_async(store.inner, key, buffer_size=8 * 1024 * 1024)

    async def write(self, data: bytes) -> None:
        self.size += len(data)
        self._sha.update(data)
        await self._file.write(data)

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    async def close(self) -> None:
        try:
            await self._file.close()
        except Exception as exc:  # obstore raises many kinds; all mean the write failed
            raise StorageError(f"could not store {self.key}: {exc}") from exc


class BlobStore:
    def __init__(self, inner: Any, root: Path | None = None):
        self.inner = inner
        self.root = root  # set for a local directory: lets us fsync and sweep staging files

    @classmethod
    def from_url(cls, url: str | None, default_root: Path) -> BlobStore:
        """``None`` or ``file:///dir``: a local directory; ``s3://bucket/prefix``: S3 or any
        S3-compatible server, configured by the usual ``AWS_*`` environment variables
        (``AWS_ENDPOINT_URL`` for MinIO and friends; plain ``http://`` endpoints are allowed)."""
        if not url:
            return cls.local(default_root)
        if url.startswith("file://"):
            return cls.local(Path(url.removeprefix("file://")))
        if url.startswith("s3://"):
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
            options: Any = {"allow_http": True} if endpoint.startswith("http://") else None
            return cls(S3Store.from_url(url, client_options=options))
        raise ValueError(f"unsupported storage URL {url!r}: use s3://bucket/prefix or file:///path")

    @classmethod
    def local(cls, root: Path) -> BlobStore:
        root.mkdir(parents=True, exist_ok=True)
        return cls(LocalStore(str(root), mkdir=True), root)

    async def put_durable(self, key: str, data: bytes) -> None:
        """``put``, and on a local directory also fsync, so a checkpoint that the database
        records survives a power loss, not only a killed process."""
        await self.put(key, data)
        if self.root is not None:
            await asyncio.to_thread(_fsync, self.root / key)

    async def list_keys(self, prefix: str) -> AsyncIterator[tuple[str, float]]:
        """(key, last-modified unix time) of stored objects under ``prefix``."""
        async for page in obstore.list(self.inner, prefix=prefix, chunk_size=1000):
            for meta in page:
                yield meta["path"], meta["last_modified"].timestamp()

    def sweep_staging(self, older_than: float) -> int:
        """Delete a local store's half-written staging files (``name#N``) that a killed
        process left behind; obstore removes them itself on a clean exit."""
        if self.root is None:
            return 0
        removed = 0
        for path in self.root.rglob("*#*"):
            with contextlib.suppress(FileNotFoundError):
                if path.is_file() and path.stat().st_mtime < older_than:
                    path.unlink()
                    removed += 1
        return removed

    def writer(self, key: str) -> BlobWriter:
        return BlobWriter(self, key)

    async def put(self, key: str, data: bytes) -> None:
        try:
            await obstore.put_async(self.inner, key, data)
        except Exception as exc:
            raise StorageError(f"could not store {key}: {exc}") from exc

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        try:
            return bytes(await obstore.get_range_async(self.inner, key, start=start, end=end))
        except (NotFoundError, FileNotFoundError) as exc:  # a local store raises the latter
            raise BlobMissing(f"missing object {key}") from exc

    def local_path(self, key: str) -> Path | None:
        """The file behind ``key`` on a local directory store (None on S3): bulk readers
        such as validation read it directly, which is many times cheaper than a stream."""
        return self.root / key if self.root is not None else None

    async def size(self, key: str) -> int:
        try:
            meta = await obstore.head_async(self.inner, key)
        except NotFoundError as exc:
            raise BlobMissing(f"missing object {key}") from exc
        return int(meta["size"])

    async def stream(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Yield the object's bytes in ~1 MiB pieces, from ``start`` to ``end``."""
        options: dict[str, Any] = {}
        if start or end is not None:
            options["range"] = (start, end) if end is not None else {"offset": start}
        try:
            result = await obstore.get_async(self.inner, key, options=options or None)  # type: ignore[arg-type]
        except (NotFoundError, FileNotFoundError) as exc:
            raise BlobMissing(f"missing object {key}") from exc
        async for piece in result.stream(min_chunk_size=READ_CHUNK):
            yield bytes(piece)

    async def delete(self, key: str) -> None:
        try:
            await obstore.delete_async(self.inner, key)
        except NotFoundError:
            pass


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
