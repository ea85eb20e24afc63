"""The ``rebuildd`` command: serve, db upgrade, seed-demo, adopt.

Owns argument parsing, building Settings once and the refusals of the start (an unknown
setting, an unauthenticated API beyond loopback); everything else is called from here.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass

import click
import uvloop

from rebuildd import errors, logconfig
from rebuildd import settings as settings_module
from rebuildd.ports import StepObserver
from rebuildd.settings import Settings


@dataclass(frozen=True, slots=True)
class Hooks:
    """What a program embedding the CLI may hand to ``serve`` (``main(args, obj=Hooks(...))``):
    a step observer, given to the job runner. rebuildd itself never sets one."""

    observer: StepObserver | None = None


def _settings() -> Settings:
    try:
        settings = settings_module.load()
    except settings_module.ConfigError as exc:
        raise click.ClickException(f"cannot start: {exc}") from None
    logconfig.configure(level=settings.log_level, fmt=settings.log_format)
    return settings


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` keeps the API on this machine (a name other than
    localhost may resolve anywhere, so it counts as beyond loopback)."""
    if host.rstrip(".").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _refuse_insecure_listen(settings: Settings) -> None:
    """auth=none makes every caller admin: only this machine may call, unless told so."""
    if settings.auth != "none" or settings.allow_insecure_listen:
        return
    if not is_loopback(settings.listen_host):
        where = settings.listen_host or "every interface"
        raise click.ClickException(
            f"cannot start: REBUILDD_AUTH=none would serve an unauthenticated admin API on "
            f"{where}; listen on loopback, set REBUILDD_AUTH to token or keystone, or set "
            "REBUILDD_ALLOW_INSECURE_LISTEN=true"
        )


@click.group()
def main() -> None:
    """rebuildd: rebuild virtual machines in place, with Nova's compute API."""


@main.command()
@click.option(
    "--host", default=None, help="Address to listen on (default REBUILDD_LISTEN_HOST or 127.0.0.1)."
)
@click.option("--port", default=None, type=int, help="Port (default REBUILDD_LISTEN_PORT or 8774).")
@click.pass_context
def serve(context: click.Context, host: str | None, port: int | None) -> None:
    """Serve the compute and image APIs until SIGTERM/SIGINT."""
    from rebuildd import daemon

    settings = _settings()
    if host is not None:
        settings = settings.model_copy(update={"listen_host": host})
    _refuse_insecure_listen(settings)
    hooks = context.find_object(Hooks) or Hooks()
    # uvloop: libuv's event loop, several times cheaper per callback than asyncio's own
    # (measured in bench/; see the README's benchmark section).
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        try:
            runner.run(
                daemon.serve(
                    settings,
                    host=settings.listen_host,
                    port=port if port is not None else settings.listen_port,
                    observer=hooks.observer,
                )
            )
        except daemon.SettingsError as exc:
            raise click.ClickException(f"cannot start: {exc}") from None
        except errors.ServiceUnavailable as exc:  # Keystone, for the catalog, at start
            raise click.ClickException(f"cannot start: {exc.message}") from None


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
    """Create the demo flavors and two demo images (idempotent); with
    REBUILDD_IMAGE_BACKEND=glance only the flavors (images are uploaded to Glance)."""
    from rebuildd import demo
    from rebuildd.disks import DiskManager
    from rebuildd.images import LocalImageService
    from rebuildd.storage import Store, create_engine

    settings = _settings()

    async def run() -> list[str]:
        store = Store(create_engine(settings.effective_database_url))
        try:
            if settings.image_backend == "glance":
                await demo.seed_flavors(store)
                return []
            disks = DiskManager(settings.state_dir / "instances", qemu_img=settings.qemu_img)
            images = LocalImageService(store, settings.state_dir / "images", disks)
            return await demo.seed(store, images, disks)
        finally:
            await store.close()

    for image_id in asyncio.run(run()):
        click.echo(image_id)


@main.command()
@click.option(
    "--all", "adopt_all", is_flag=True, help="Adopt every domain rebuildd does not know yet."
)
@click.argument("domains", nargs=-1)
def adopt(adopt_all: bool, domains: tuple[str, ...]) -> None:
    """Register existing libvirt domains (DOMAIN names, or --all) as rebuildd servers.

    Prints one line per adopted domain; a domain that cannot be adopted gets a line on
    stderr. Exits 1 when nothing was adopted or a named domain does not exist.
    """
    from rebuildd import adopt as adoption
    from rebuildd import migrations
    from rebuildd.disks import DiskManager
    from rebuildd.hypervisor import LibvirtHypervisor
    from rebuildd.storage import Store, create_engine

    if adopt_all == bool(domains):
        raise click.UsageError("name the domains to adopt, or give --all (not both)")
    settings = _settings()
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    migrations.upgrade(settings.effective_database_url)
    defaults = adoption.Defaults(
        host=settings.effective_host, project_id=settings.project_id, user_id=settings.user_id
    )

    async def run() -> adoption.Report:
        store = Store(create_engine(settings.effective_database_url))
        hypervisor = LibvirtHypervisor(settings.libvirt_uri, threads=settings.libvirt_threads)
        disks = DiskManager(settings.state_dir / "instances", qemu_img=settings.qemu_img)
        try:
            await hypervisor.open()
            names = None if adopt_all else list(domains)
            return await adoption.adopt(store, hypervisor, disks, defaults, names)
        finally:
            await hypervisor.close()
            await store.close()

    try:
        report = asyncio.run(run())
    except errors.RebuilddError as exc:
        raise click.ClickException(exc.message) from exc
    for done in report.adopted:
        click.echo(
            f"adopted {done.domain} as server {done.server.id} (flavor {done.server.flavor.id})"
        )
        if done.warning:
            click.echo(f"warning: {done.domain}: {done.warning}", err=True)
    for refused in report.refused:
        click.echo(f"not adopted {refused.domain}: {refused.reason}", err=True)
    if report.candidates == 0:
        click.echo("no domain left to adopt", err=True)
        return
    if not report.adopted or any(r.missing for r in report.refused):
        raise SystemExit(1)
