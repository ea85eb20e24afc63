"""The Alembic migrations build exactly the tables the code uses, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import Connection
from sqlmodel import SQLModel

import rebuildd.tables  # noqa: F401
from rebuildd import migrations
from rebuildd.storage import create_engine

TABLES = {
    "alembic_version",
    "flavors",
    "images",
    "key_pairs",
    "servers",
    "block_device_mappings",
    "instance_actions",
    "instance_action_events",
    "instance_faults",
    "notifications",
    "volumes",
    "volume_attachments",
}


def _inspect(url: str, fn: Any) -> Any:
    async def run() -> Any:
        engine = create_engine(url)
        try:
            async with engine.connect() as conn:
                return await conn.run_sync(fn)
        finally:
            await engine.dispose()

    return asyncio.run(run())


def _diff(conn: Connection) -> list[Any]:
    context = MigrationContext.configure(conn, opts={"compare_type": True})
    return list(compare_metadata(context, SQLModel.metadata))


def test_upgrade_builds_every_table_and_matches_the_models(database_url: str) -> None:
    """After ``upgrade head`` the schema equals the SQLModel tables (no autogenerate diff)."""
    migrations.upgrade(database_url)
    tables = _inspect(database_url, lambda conn: set(inspect(conn).get_table_names()))
    assert tables == TABLES
    assert _inspect(database_url, _diff) == []


def test_downgrade_to_base_removes_everything(database_url: str) -> None:
    """The migration is reversible: ``downgrade base`` leaves only Alembic's own table."""
    migrations.upgrade(database_url)
    migrations.downgrade(database_url, "base")
    tables = _inspect(database_url, lambda conn: set(inspect(conn).get_table_names()))
    assert tables == {"alembic_version"}
