"""Dependency aliases, so handlers declare what they use in one word."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from batchd.blobs import BlobStore
from batchd.config import Settings
from batchd.store import Store

DEFAULT_PROJECT = "default"


def _store(request: Request) -> Store:
    return request.app.state.store  # type: ignore[no-any-return]


def _blobs(request: Request) -> BlobStore:
    return request.app.state.blobs  # type: ignore[no-any-return]


def _settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def _project(request: Request) -> str:
    """Every object belongs to a project; one project until API keys bring more."""
    return DEFAULT_PROJECT


StoreDep = Annotated[Store, Depends(_store)]
BlobsDep = Annotated[BlobStore, Depends(_blobs)]
SettingsDep = Annotated[Settings, Depends(_settings)]
ProjectDep = Annotated[str, Depends(_project)]
