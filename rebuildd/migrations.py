"""Alembic, run from code: ``rebuildd db upgrade`` and the tests use this, not alembic.ini.

Owns where the migration scripts are (``alembic/`` in a checkout, ``rebuildd/_alembic`` in a
wheel) and running them against a URL.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy.ext.asyncio import AsyncEngine

from alembic import command

_PACKAGE = Path(__file__).resolve().parent


def script_location() -> Path:
    for candidate in (_PACKAGE / "_alembic", _PACKAGE.parent / "alembic"):
        if (candidate / "env.py").exists():
            return candidate
    raise FileNotFoundError("rebuildd's Alembic scripts are missing from this installation")


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(script_location()))
    config.attributes["url"] = url
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at ``url`` (blocking; runs its own event loop)."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)


def head() -> str | None:
    """The newest revision this installation's scripts know."""
    return ScriptDirectory.from_config(alembic_config("")).get_current_head()


async def unmigrated(engine: AsyncEngine) -> str | None:
    """Why the database behind ``engine`` cannot be served as it is (never migrated, or at a
    revision other than :func:`head`), in one line that says what to run; None when it is at
    head."""
    try:
        async with engine.connect() as conn:
            current = (
                await conn.execute(sa.text("SELECT version_num FROM alembic_version"))
            ).scalar()
    except sa.exc.DBAPIError:
        current = None
    latest = head()
    if current == latest:
        return None
    if current is None:
        return "the database has no schema yet: run `rebuildd db upgrade` first"
    return (
        f"the database is at revision {current}, this rebuildd needs {latest}: "
        "run `rebuildd db upgrade` first"
    )
