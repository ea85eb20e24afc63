"""Shared fixtures: real databases after real migrations, and live daemons served by uvicorn.

A component may be skipped only when it is truly absent, and never in CI (``CI=true``), where
``make test`` has started everything: there a missing component fails the test instead.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from rebuildd import migrations
from rebuildd.storage import Store, create_engine
from tests import cinder as real_cinder
from tests import glance as real_glance
from tests import keystone as real_keystone
from tests.live import LiveDaemon, start_live_daemon

POSTGRES_ADMIN_URL = os.environ.get(
    "TEST_REBUILDD_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)


def require(component: str, reason: str) -> None:
    """Skip because ``component`` is absent, except in CI, where it must be present."""
    if os.environ.get("CI"):
        pytest.fail(f"{component} is required in CI but absent: {reason}")
    pytest.skip(f"{component} is absent: {reason}")


async def _postgres_database() -> str:
    """Create a fresh database on the test PostgreSQL; return its URL."""
    name = f"rebuildd_test_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        await admin.dispose()
    return POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


async def _drop_postgres_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    admin = create_async_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        await admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'rebuildd.db'}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    try:
        url = asyncio.run(_postgres_database())
    except (OSError, Exception) as exc:  # asyncpg raises several unrelated types when down
        require("PostgreSQL", f"{POSTGRES_ADMIN_URL}: {exc}")
        raise
    try:
        yield url
    finally:
        asyncio.run(_drop_postgres_database(url))


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    """Each Store test runs on SQLite and on PostgreSQL."""
    fixture = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    return str(request.getfixturevalue(fixture))


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    await asyncio.to_thread(migrations.upgrade, database_url)
    store = Store(create_engine(database_url))
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[LiveDaemon]:
    """rebuildd on its embedded default (SQLite, test:///default, local images), over HTTP."""
    live = start_live_daemon(tmp_path)
    try:
        yield live
    finally:
        live.stop()


@pytest.fixture(scope="session")
def keystone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[real_keystone.Keystone]:
    """A real Keystone (tests/keystone.py) for the whole session, torn down after."""
    if not (real_keystone.VENV / "bin" / "keystone-manage").exists():
        require("Keystone", f"no venv at {real_keystone.VENV} (scripts/openstack-venvs.sh)")
    started = real_keystone.start_keystone(tmp_path_factory.mktemp("keystone"))
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="session")
def cinder_glance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[real_glance.Glance]:
    """The real Glance (tests/glance.py) the session's Cinder reads images from (the Glance of
    tests/test_glance_live.py is that module's own)."""
    if not (real_glance.VENV / "bin" / "glance-manage").exists():
        require("Glance", f"no venv at {real_glance.VENV} (scripts/openstack-venvs.sh)")
    started = real_glance.start_glance(tmp_path_factory.mktemp("cinder-glance"))
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="session")
def cinder(
    keystone: real_keystone.Keystone,
    cinder_glance: real_glance.Glance,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[real_cinder.Cinder]:
    """A real Cinder (tests/cinder.py: NFS driver on a bind mount, Keystone auth, images from
    ``cinder_glance``) for the whole session, in the catalog; torn down (and unmounted) after."""
    if not (real_cinder.VENV / "bin" / "cinder-manage").exists():
        require("Cinder", f"no venv at {real_cinder.VENV} (scripts/openstack-venvs.sh)")
    if not Path("/sbin/mount.nfs").exists():
        require("Cinder", "no mount.nfs (nfs-common: scripts/ensure-packages.sh test)")
    if os.geteuid() != 0:
        require("Cinder", "needs root for the bind mount of its NFS share")
    started = real_cinder.start_cinder(
        tmp_path_factory.mktemp("cinder"), keystone, cinder_glance.url
    )
    try:
        yield started
    finally:
        started.stop()
