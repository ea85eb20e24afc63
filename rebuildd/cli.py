"""The ``rebuildd`` command: serve, db upgrade, seed-demo.

Owns argument parsing and building Settings once; everything else is called from here.
"""

from __future__ import annotations

import asyncio

import click
import uvloop

from rebuildd import logconfig
from rebuildd.settings import Settings


def _settings() -> Settings:
    settings = Settings()
    logconfig.configure(level=settings.log_level, fmt=settings.log_format)
    return settings


@click.group()
def main() -> None:
    """rebuildd: rebuild virtual machines in place, with Nova's compute API."""


@main.command()
@click.option(
    "--host", default=None, help="Address to listen on (default REBUILDD_LISTEN_HOST or 127.0.0.1)."
)
@click.option("--port", default=None, type=int, help="Port (default REBUILDD_LISTEN_PORT or 8774).")
def serve(host: str | None, port: int | None) -> None:
    """Serve the compute and image APIs until SIGTERM/SIGINT."""
    from rebuildd import daemon

    settings = _settings()
    # uvloop: libuv's event loop, several times cheaper per callback than asyncio's own
    # (measured in bench/; see the README's benchmark section).
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(
            daemon.serve(
                settings,
                host=host or settings.listen_host,
                port=port if port is not None else settings.listen_port,
            )
        )


@main.group()
def db() -> None:
    """Database schema commands."""


@db.command()
@click.argument("revision", default="head")
def upgrade(revision: str) -> None:
    """Apply Alembic migrations up to REVISION (default: head)."""
    from rebuildd import migrations

    settings = _settings()
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    migrations.upgrade(settings.effective_database_url, revision)
    click.echo(f"database at revision {revision}")


@main.command("seed-demo")
def seed_demo() -> None:
    """Create the demo flavors and two demo images (idempotent)."""
    from rebuildd import demo
    from rebuildd.disks import DiskManager
    from rebuildd.images import LocalImageService
    from rebuildd.storage import Store, create_engine

    settings = _settings()

    async def run() -> list[str]:
        store = Store(create_engine(settings.effective_database_url))
        try:
            disks = DiskManager(settings.state_dir / "instances", qemu_img=settings.qemu_img)
            images = LocalImageService(store, settings.state_dir / "images", disks)
            return await demo.seed(store, images, disks)
        finally:
            await store.close()

    for image_id in asyncio.run(run()):
        click.echo(image_id)
