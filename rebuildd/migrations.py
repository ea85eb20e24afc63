"""Alembic, run from code: ``rebuildd db upgrade`` and the tests use this, not alembic.ini.

Owns where the migration scripts are (``alembic/`` in a checkout, ``rebuildd/_alembic`` in a
wheel) and running them against a URL.
"""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config

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
