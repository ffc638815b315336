"""Bytes: uploaded files and result parts, through obstore (local directory now, S3 later)."""

from batchd.blobs.store import BlobStore, BlobWriter

__all__ = ["BlobStore", "BlobWriter"]
