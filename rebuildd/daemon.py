"""The daemon: builds every service from the settings, serves the API with uvicorn, and shuts
down gracefully (stop accepting jobs, let running ones finish within a timeout).

Owns process lifetime: start-up order, systemd readiness (``sd_notify``), signals, close-down.
It is the only place that turns Settings into objects.

Start-up order: services open, then the API listens at once while restart recovery runs
beside it (recovery.py). ``/healthz`` answers while the process lives; ``/readyz`` only once
the database answers, libvirt is connected and recovery is done. systemd hears
``EXTEND_TIMEOUT_USEC``/``STATUS=`` while recovery runs, ``READY=1`` once the API listens and
recovery is done, ``WATCHDOG=1`` when the unit sets ``WatchdogSec``, ``STOPPING=1`` on drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import httpx
import structlog
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from sqlalchemy.ext.asyncio import AsyncEngine

from rebuildd import cinder, glance, httpguard, lifecycle, migrations, recovery, sdnotify
from rebuildd.api import ImageAPI, Services, create_app
from rebuildd.auth import Authenticator, Policy, TokensFileError, TokenTable
from rebuildd.cinder import CinderVolumeService
from rebuildd.disks import DiskManager, blank_base_name
from rebuildd.errors import HypervisorUnavailable
from rebuildd.glance import GlanceImageService
from rebuildd.hypervisor import LibvirtHypervisor
from rebuildd.images import ImageCache, LocalImageService, recover_interrupted
from rebuildd.instance_events import InstanceEvents
from rebuildd.keystone import (
    TIMEOUT,
    KeystoneAuthenticator,
    KeystoneConfig,
    ServiceSession,
    ServiceTokenAuth,
)
from rebuildd.lifecycle import DomainSettings
from rebuildd.metrics import Metrics
from rebuildd.notifications import Notifier
from rebuildd.pipeline import Deps
from rebuildd.ports import Hypervisor, StepObserver, VolumeService
from rebuildd.powersync import PowerSync
from rebuildd.runner import Runner
from rebuildd.settings import Settings
from rebuildd.storage import ServerFilters, Store, create_engine
from rebuildd.volumes import LocalVolumeService
from rebuildd.volumestore import VolumeStore

log = structlog.get_logger("rebuildd.daemon")

# While recovery runs, systemd's start timeout is pushed this far ahead, this often.
_EXTEND_USEC: Final = 30_000_000
_EXTEND_EVERY: Final = 5.0


class SettingsError(ValueError):
    """Settings that cannot work together (found at start, before anything is opened): the
    CLI prints the message and exits, without a traceback."""


@dataclass(slots=True)
class Daemon:
    """The running parts, so tests and the CLI can open and close them explicitly."""

    settings: Settings
    store: Store
    hypervisor: LibvirtHypervisor
    services: Services
    cache: ImageCache
    powersync: PowerSync
    # The long-lived clients of upstream services (Glance), closed last.
    http_clients: list[httpx.AsyncClient] = field(default_factory=list)
    progress: recovery.Progress = field(default_factory=recovery.Progress)
    recovery_task: asyncio.Task[int] | None = None
    extend_task: asyncio.Task[None] | None = None
    listening: bool = False
    ready_sent: bool = False
    closed: bool = False

    def start(self, domain: DomainSettings, volumes: VolumeStore) -> None:
        """Lifecycle events to the power sync; restart recovery in the background."""
        self.hypervisor.listen(self.powersync.poke)

        async def run() -> int:
            delay = 1.0
            while True:
                try:
                    found = await recovery.recover(
                        self.services.deps,
                        domain,
                        volumes=volumes,
                        limit=self.settings.max_concurrent_operations,
                        progress=self.progress,
                    )
                    break
                except Exception:  # the database not answering yet: not ready, try again
                    log.exception("recovery failed; retrying", retry_in=delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30.0)
            self.announce_ready()
            return found

        self.extend_task = asyncio.create_task(_extend_while_recovering(self.progress))
        self.recovery_task = asyncio.create_task(run(), name="recovery")

    async def readiness(self) -> dict[str, bool]:
        """What /readyz checks: the database answers, libvirt is connected, recovery is done."""
        try:
            await self.store.list_servers(ServerFilters(limit=1))
            database = True
        except Exception:
            database = False
        return {
            "database": database,
            "libvirt": self.hypervisor.available,
            "recovery": self.progress.done.is_set(),
        }

    def announce_ready(self) -> None:
        """READY=1 to systemd once the API listens and recovery is done (once)."""
        if self.listening and self.progress.done.is_set() and not self.ready_sent:
            self.ready_sent = True
            sdnotify.notify("READY=1")

    async def close(self, *, drain_timeout: float) -> None:
        """Drain running jobs, then close libvirt, the file threads, the upstream clients
        (Keystone, Glance) and the database (idempotent)."""
        if self.closed:
            return
        self.closed = True
        if self.recovery_task is not None and not self.recovery_task.done():
            # Recovery's jobs drain like any other; what is cut short is journaled: the next
            # start recovers it again.
            self.services.deps.runner.accepting = False
            await asyncio.wait([self.recovery_task], timeout=drain_timeout)
        for task in (self.extend_task, self.recovery_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.services.deps.runner.drain(drain_timeout)
        await self.hypervisor.close()
        self.cache.disks.close()
        if self.services.authenticator is not None:
            await self.services.authenticator.aclose()
        for client in self.http_clients:
            await client.aclose()
        await self.store.close()
        log.info("daemon closed")


def _make_state_dir(state: Path) -> None:
    """The state directory's parts. Secrets at rest: QEMU (its own user under libvirt's DAC
    driver) traverses to its disks but nobody else lists them; the image store is rebuildd's
    alone (QEMU reads the bases in _base); the database is 0600 (storage.py)."""
    for sub in ("images", "_base", "instances", "volumes"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    state.chmod(0o711)
    (state / "images").chmod(0o700)


async def _migrated_engine(settings: Settings) -> AsyncEngine:
    """The database's engine, once its schema is at this rebuildd's head revision (else the
    start stops with one line saying to run ``rebuildd db upgrade``)."""
    engine = create_engine(settings.effective_database_url)
    if (problem := await migrations.unmigrated(engine)) is not None:
        await engine.dispose()
        raise SettingsError(problem)
    return engine


async def open_daemon(
    settings: Settings,
    *,
    observer: StepObserver | None = None,
    hypervisor_port: Callable[[LibvirtHypervisor], Hypervisor] | None = None,
    keystone_transport: httpx.AsyncBaseTransport | None = None,
    glance_transport: httpx.AsyncBaseTransport | None = None,
    cinder_transport: httpx.AsyncBaseTransport | None = None,
) -> Daemon:
    """Open every service and start restart recovery (it runs on while the API serves:
    ``Daemon.progress``). ``observer`` and ``hypervisor_port`` let
    tests watch step boundaries and put a fault injector in front of libvirt;
    ``keystone_transport``, ``glance_transport`` and ``cinder_transport`` carry the calls to
    Keystone, Glance and Cinder (default: the network)."""
    # Identity and the upstream endpoints first: a setting that is wrong fails the start
    # before anything is opened.
    http_clients: list[httpx.AsyncClient] = []
    authenticator, session = _identity(settings, keystone_transport, http_clients)
    try:
        upstream = await _upstream(settings, session)
    except BaseException:
        if authenticator is not None:
            await authenticator.aclose()
        for opened in http_clients:
            await opened.aclose()
        raise
    service_auth = ServiceTokenAuth(session) if session is not None else None
    state = settings.state_dir
    _make_state_dir(state)
    metrics = Metrics()
    store = Store(await _migrated_engine(settings), metrics=metrics)
    hypervisor = await _open_hypervisor(settings)
    host = settings.effective_host
    disks = DiskManager(
        state / "instances",
        base_dir=state / "_base",
        qemu_img=settings.qemu_img,
        retention_seconds=settings.old_root_disk_retention,
    )
    images: ImageAPI
    if settings.image_backend == "glance":
        assert upstream.glance_url is not None
        client = glance.new_client(
            upstream.glance_url,
            timeout=settings.glance_timeout,
            transport=glance_transport,
            auth=service_auth,
        )
        http_clients.append(client)
        images = GlanceImageService(client)
    else:
        images = LocalImageService(store, state / "images", disks)
    notifier = Notifier(host=host)
    runner = Runner(
        store,
        notifier,
        host=host,
        limit=settings.max_concurrent_operations,
        observer=observer,
        metrics=metrics,
        undo_retry_timeout=settings.undo_retry_timeout,
    )
    runner.gate = functools.partial(_check_hypervisor, hypervisor)
    policy = Policy.load(settings.policy_file)
    cache = ImageCache(state / "_base", images, disks, metrics=metrics)
    volume_store = VolumeStore(store)
    instance_events = InstanceEvents()
    local_volumes: LocalVolumeService | None = None
    volumes: VolumeService
    if settings.volume_backend == "cinder":
        assert upstream.cinder_url is not None
        client = cinder.new_client(
            upstream.cinder_url,
            timeout=settings.cinder_timeout,
            transport=cinder_transport,
            auth=service_auth,
        )
        http_clients.append(client)
        volumes = CinderVolumeService(
            client,
            nfs_mount_point_base=settings.nfs_mount_point_base or state / "mnt",
            wait_timeout=settings.cinder_wait_timeout,
        )
    else:
        volumes = local_volumes = LocalVolumeService(
            volume_store,
            state / "volumes",
            disks,
            cache,
            events=instance_events,
            max_size_gb=settings.max_volume_size_gb,
        )
    deps = Deps(
        store=store,
        hypervisor=hypervisor_port(hypervisor) if hypervisor_port else hypervisor,
        images=images,
        cache=cache,
        disks=disks,
        runner=runner,
        host=host,
        shutdown_timeout=settings.shutdown_timeout,
        policy=policy,
        volumes=volumes,
        reimage_timeout_per_gb=settings.reimage_timeout_per_gb,
        failed_rebuild_state=settings.failed_rebuild_state,
        instance_events=instance_events,
        redefine=lambda server: lifecycle.define_anew(deps, domain, server),
    )
    choice = await hypervisor.choose_domain_type(settings.domain_type)
    domain = DomainSettings(
        domain_type=choice.domain_type,
        name_prefix=settings.domain_name_prefix,
        interface=settings.interface_type,
        network=settings.interface_network,
        ephemeral_format=settings.ephemeral_format,
        force_config_drive=settings.force_config_drive,
        console_log_dir=str(settings.console_log_dir) if settings.console_log_dir else None,
    )
    services = Services(
        deps=deps,
        store=store,
        images=images,
        domain=domain,
        public_url=settings.public_url,
        project_id=settings.project_id,
        user_id=settings.user_id,
        policy=policy,
        authenticator=authenticator,
        max_body_bytes=settings.max_body_bytes,
        allowed_hosts=settings.trusted_hosts,
        volumes=local_volumes,
        volume_store=volume_store,
    )
    await recover_interrupted(images, cache, store)
    log.info(
        "daemon opened",
        database=_redact(settings.effective_database_url),
        libvirt_uri=settings.libvirt_uri,
        state_dir=str(state),
        host=host,
        image_backend=settings.image_backend,
        volume_backend=settings.volume_backend,
    )
    daemon = Daemon(
        settings=settings,
        store=store,
        hypervisor=hypervisor,
        services=services,
        cache=cache,
        powersync=PowerSync(store, hypervisor, interval=settings.power_sync_interval),
        http_clients=http_clients,
    )
    daemon.start(domain, volume_store)
    return daemon


async def _open_hypervisor(settings: Settings) -> LibvirtHypervisor:
    hypervisor = LibvirtHypervisor(
        settings.libvirt_uri,
        threads=settings.libvirt_threads,
        detach_timeout=settings.volume_detach_timeout,
    )
    await hypervisor.open()
    return hypervisor


def _check_hypervisor(hypervisor: LibvirtHypervisor) -> None:
    """The runner's gate: no action is accepted while libvirt is down (503 before the 202)."""
    if not hypervisor.available:
        raise HypervisorUnavailable(
            uri=hypervisor.uri, reason=hypervisor.down_reason or "not connected"
        )


def _identity(
    settings: Settings,
    transport: httpx.AsyncBaseTransport | None,
    http_clients: list[httpx.AsyncClient],
) -> tuple[Authenticator | None, ServiceSession | None]:
    """The authenticator of ``REBUILDD_AUTH`` (None: authentication is off), and rebuildd's own
    Keystone session when the service credentials are set (for Glance, Cinder and the
    catalog; with ``auth=keystone`` the authenticator's)."""
    config = keystone_config(settings)
    authenticator: Authenticator | None = None
    if settings.auth == "token":
        if settings.tokens_file is None:
            raise SettingsError("REBUILDD_AUTH=token needs REBUILDD_TOKENS_FILE")
        try:
            authenticator = TokenTable.load(settings.tokens_file)
        except TokensFileError as exc:
            raise SettingsError(f"REBUILDD_TOKENS_FILE {exc}") from None
    if config is None:
        return authenticator, None
    if settings.auth == "keystone":
        keystone_auth = KeystoneAuthenticator(config, transport=transport)
        return keystone_auth, keystone_auth.session
    client = httpx.AsyncClient(base_url=config.api_url, transport=transport, timeout=TIMEOUT)
    http_clients.append(client)
    return authenticator, ServiceSession(config, client)


def keystone_config(settings: Settings) -> KeystoneConfig | None:
    """rebuildd's Keystone credentials (the ``REBUILDD_KEYSTONE_*`` settings): required for
    ``auth=keystone`` and ``volume_backend=cinder``, otherwise used when all are set."""
    required = {
        "REBUILDD_KEYSTONE_URL": settings.keystone_url,
        "REBUILDD_KEYSTONE_USERNAME": settings.keystone_username,
        "REBUILDD_KEYSTONE_PASSWORD": settings.keystone_password,
        "REBUILDD_KEYSTONE_PROJECT_NAME": settings.keystone_project_name,
    }
    missing = [name for name, value in required.items() if not value]
    needed_by = [
        name
        for name, needs in (
            ("REBUILDD_AUTH=keystone", settings.auth == "keystone"),
            ("REBUILDD_VOLUME_BACKEND=cinder", settings.volume_backend == "cinder"),
        )
        if needs
    ]
    if missing:
        if needed_by:
            raise SettingsError(f"{' and '.join(needed_by)} needs {', '.join(missing)}")
        return None
    assert settings.keystone_password is not None  # checked just above
    return KeystoneConfig(
        url=str(settings.keystone_url),
        username=str(settings.keystone_username),
        password=settings.keystone_password.get_secret_value(),
        project_name=str(settings.keystone_project_name),
        user_domain_name=settings.keystone_user_domain_name,
        project_domain_name=settings.keystone_project_domain_name,
        cache_seconds=settings.keystone_cache_seconds,
    )


# Catalog service types, in the order keystoneauth's service-types authority aliases them.
CATALOG_TYPES: Final = {
    "glance": ("image",),
    "cinder": ("block-storage", "volumev3", "volume"),
}


@dataclass(frozen=True, slots=True)
class _Upstream:
    glance_url: str | None
    cinder_url: str | None


async def _upstream(settings: Settings, session: ServiceSession | None) -> _Upstream:
    """The URLs of the backends in use (None for one not in use)."""
    glance_url = cinder_url = None
    if settings.image_backend == "glance":
        glance_url = await service_endpoint(
            settings.glance_url, session, settings, service="glance"
        )
    if settings.volume_backend == "cinder":
        cinder_url = await service_endpoint(
            settings.cinder_url, session, settings, service="cinder"
        )
    return _Upstream(glance_url=glance_url, cinder_url=cinder_url)


async def service_endpoint(
    url: str | None, session: ServiceSession | None, settings: Settings, *, service: str
) -> str:
    """An upstream service's URL: its ``REBUILDD_<SERVICE>_URL``, else the Keystone catalog's
    endpoint of its type (``catalog_interface``, ``catalog_region``), as Nova finds Glance
    and Cinder through keystoneauth."""
    if url:
        return url
    name = f"REBUILDD_{service.upper()}_URL"
    if session is None:
        raise SettingsError(f"{service} needs {name} or the REBUILDD_KEYSTONE_* credentials")
    try:
        found = await session.endpoint(
            CATALOG_TYPES[service],
            interface=settings.catalog_interface,
            region=settings.catalog_region,
        )
    except LookupError as exc:
        raise SettingsError(f"{service}: {exc}; set {name}") from None
    log.info("endpoint from the catalog", service=service, url=found)
    return found


def build_app(daemon: Daemon) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        periodic = [
            asyncio.create_task(_sweep_retired_disks(daemon)),
            asyncio.create_task(_clean_image_cache(daemon)),
            asyncio.create_task(daemon.powersync.run()),
            asyncio.create_task(_watchdog()),
        ]
        yield
        for task in periodic:
            task.cancel()
        sdnotify.notify("STOPPING=1")
        # Close here, not after serve() returns: uvicorn re-raises SIGTERM once it has
        # stopped, so code after serve() never runs on a signal.
        await daemon.close(drain_timeout=daemon.settings.drain_timeout)

    app = create_app(daemon.services, lifespan=lifespan)

    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    async def readyz() -> JSONResponse:
        checks = await daemon.readiness()
        ready = all(checks.values())
        body = {"status": "ready" if ready else "not ready", "checks": checks}
        return JSONResponse(body, status_code=200 if ready else 503)

    app.add_api_route("/healthz", healthz, methods=["GET"], include_in_schema=False)
    app.add_api_route("/readyz", readyz, methods=["GET"], include_in_schema=False)
    return app


async def _extend_while_recovering(progress: recovery.Progress) -> None:
    """More start time for systemd and a status line, from the start until recovery ends."""
    while True:
        sdnotify.notify(
            f"EXTEND_TIMEOUT_USEC={_EXTEND_USEC}",
            f"STATUS=recovering: {progress.finished} of {progress.total} actions done",
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(progress.done.wait(), _EXTEND_EVERY)
        if progress.done.is_set():
            return


async def _watchdog() -> None:
    """WATCHDOG=1 at half the unit's WatchdogSec, from the event loop (a stuck loop stops it)."""
    interval = sdnotify.watchdog_interval()
    while interval is not None:
        sdnotify.notify("WATCHDOG=1")
        await asyncio.sleep(interval)


async def serve(
    settings: Settings, *, host: str, port: int, observer: StepObserver | None = None
) -> None:
    daemon = await open_daemon(settings, observer=observer)
    _reload_tokens_on_hangup(daemon)
    try:
        app = build_app(daemon)
        config = uvicorn_config(app, settings, host=host, port=port)
        await _NotifyingServer(config, daemon).serve()
    finally:
        await daemon.close(drain_timeout=settings.drain_timeout)


def uvicorn_config(app: FastAPI, settings: Settings, *, host: str, port: int) -> uvicorn.Config:
    """uvicorn serving ``app`` under the connection limits of the settings (httpguard.py)."""
    limits = httpguard.Limits(
        max_connections=httpguard.connection_limit(settings.max_connections),
        max_header_bytes=settings.max_header_bytes,
        max_header_count=settings.max_header_count,
        header_timeout=settings.header_timeout,
        body_timeout=settings.body_timeout,
    )
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=httpguard.protocol(limits),
        timeout_keep_alive=settings.keep_alive_timeout,
        log_config=None,
        access_log=False,
        lifespan="on",
    )


def _reload_tokens_on_hangup(daemon: Daemon) -> None:
    """SIGHUP reads the tokens file again (it is also read again whenever it changes)."""
    authenticator = daemon.services.authenticator
    if isinstance(authenticator, TokenTable):
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, authenticator.reload)


async def _sweep_retired_disks(daemon: Daemon) -> None:
    """Delete replaced root disks once their retention has passed (when one is set)."""
    retention = daemon.settings.old_root_disk_retention
    if retention <= 0:
        return
    disks = DiskManager(daemon.settings.state_dir / "instances", retention_seconds=retention)
    while True:
        try:
            removed = await disks.sweep_retired()
            if removed:
                log.info("retired disks removed", count=removed)
        except OSError:
            log.exception("sweeping retired disks failed")
        await asyncio.sleep(min(60.0, retention))


async def clean_image_cache_once(daemon: Daemon) -> list[str]:
    """One pass of the image cache cleanup: bases no live server (or job in flight) uses."""
    images, blanks = await daemon.store.cache_users()
    in_use = images | {blank_base_name(size, fmt) for size, fmt in blanks}
    removed = await daemon.cache.cleanup(in_use, min_age=daemon.settings.image_cache_min_age)
    if removed:
        daemon.cache.metrics.image_cache_removed.inc(len(removed))
        log.info("unused image cache bases removed", bases=removed)
    return removed


async def _clean_image_cache(daemon: Daemon) -> None:
    interval = daemon.settings.image_cache_interval
    if interval <= 0:
        return
    while True:
        await asyncio.sleep(interval)
        try:
            await clean_image_cache_once(daemon)
        except Exception:
            log.exception("image cache cleanup failed")


class _NotifyingServer(uvicorn.Server):
    """Tells systemd READY=1 only once the sockets really listen (and recovery is done)."""

    def __init__(self, config: uvicorn.Config, daemon: Daemon) -> None:
        super().__init__(config)
        self.daemon = daemon

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self.daemon.listening = True
            self.daemon.announce_ready()


def _redact(url: str) -> str:
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in creds else url
