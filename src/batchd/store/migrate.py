"""Alembic, driven from code: ``batchd serve`` upgrades on start, ``batchd migrate`` on demand."""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection

from batchd.store.engine import make_engine, normalize_url

MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "heads") -> None:
    """Apply migrations; safe to call from a thread while no event loop runs in it."""
    cfg = alembic_config(url)

    async def run() -> None:
        engine = make_engine(url)
        try:
            async with engine.begin() as conn:
                await conn.run_sync(_upgrade_sync, cfg, revision)
        finally:
            await engine.dispose()

    asyncio.run(run())


def _upgrade_sync(conn: Connection, cfg: Config, revision: str) -> None:
    cfg.attributes["connection"] = conn
    command.upgrade(cfg, revision)
