"""Metadata: the only package that speaks SQL. Everything else calls ``Store`` methods."""

from batchd.store.store import Store

__all__ = ["Store"]
