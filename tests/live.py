"""A live rebuildd for tests: the real app under real uvicorn, in a thread with its own
event loop, on a free loopback port; plus small HTTP helpers for polling as clients do."""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from rebuildd import demo, migrations
from rebuildd.daemon import Daemon, build_app, open_daemon
from rebuildd.ports import StepObserver
from rebuildd.settings import Settings

POLL_INTERVAL = 0.02
POLL_LIMIT = 60.0  # an upper bound for a hung pipeline, not a performance assertion


@dataclass
class LiveDaemon:
    settings: Settings
    url: str
    client: httpx.Client
    image_ids: list[str]
    daemon: Daemon
    _server: uvicorn.Server
    _thread: threading.Thread
    _loop: asyncio.AbstractEventLoop
    extra: dict[str, Any] = field(default_factory=dict)

    def stop(self) -> None:
        self.client.close()
        self._server.should_exit = True
        self._thread.join(timeout=30)

    def run(self, coro: Any) -> Any:
        """Run a coroutine on the daemon's event loop (to use its Store or hypervisor)."""
        return self.submit(coro).result(timeout=60)

    def submit(self, coro: Any) -> concurrent.futures.Future[Any]:
        """Start a coroutine on the daemon's event loop; its result comes later."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    # -- client helpers -----------------------------------------------------------------

    def create_server(self, name: str = "vm", *, image: int = 0, flavor: str = "1") -> str:
        body = {"server": {"name": name, "imageRef": self.image_ids[image], "flavorRef": flavor}}
        response = self.client.post("/v2.1/servers", json=body)
        assert response.status_code == 202, response.text
        server_id: str = response.json()["server"]["id"]
        self.wait_for(server_id, "ACTIVE")
        return server_id

    def server(self, server_id: str, **headers: str) -> dict[str, Any]:
        response = self.client.get(f"/v2.1/servers/{server_id}", headers=headers)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()["server"]
        return body

    def wait_for(self, server_id: str, status: str) -> dict[str, Any]:
        """Poll as ``openstack --wait`` does: until status matches and task_state is null."""
        return self.poll(
            server_id,
            lambda s: s["status"] == status and s["OS-EXT-STS:task_state"] is None,
            f"status {status}",
        )

    def poll(
        self,
        server_id: str,
        done: Callable[[dict[str, Any]], bool],
        what: str,
        *,
        allow_error: bool = False,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + POLL_LIMIT
        seen: list[str] = []
        while time.monotonic() < deadline:
            server = self.server(server_id)
            if not seen or seen[-1] != server["status"]:
                seen.append(server["status"])
            if done(server):
                return server
            if server["status"] == "ERROR" and not allow_error:
                raise AssertionError(
                    f"server went to ERROR waiting for {what}: {server.get('fault')}"
                )
            time.sleep(POLL_INTERVAL)
        raise AssertionError(f"server never reached {what}; statuses seen: {seen}")


def _free_socket() -> socket.socket:
    # IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on such sockets (else ~40 ms/request).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def start_live_daemon(
    state_dir: Path,
    *,
    observer: StepObserver | None = None,
    hypervisor_port: Callable[[Any], Any] | None = None,
    **overrides: Any,
) -> LiveDaemon:
    """Migrate, seed the demo data and serve; return once the port answers. With
    ``image_backend="glance"`` only the demo flavors are seeded: the images are Glance's (the
    caller uploads them and fills ``image_ids``)."""
    settings = Settings(state_dir=state_dir, **overrides)
    state_dir.mkdir(parents=True, exist_ok=True)
    migrations.upgrade(settings.effective_database_url)
    sock = _free_socket()
    ready = threading.Event()
    holder: dict[str, Any] = {}

    async def main() -> None:
        daemon = await open_daemon(settings, observer=observer, hypervisor_port=hypervisor_port)
        try:
            if settings.image_backend == "glance":
                await demo.seed_flavors(daemon.store)
                holder["images"] = []
            else:
                holder["images"] = await demo.seed(
                    daemon.store,
                    daemon.services.images,  # type: ignore[arg-type]
                    daemon.services.deps.disks,  # type: ignore[arg-type]
                )
            holder["daemon"] = daemon
            # A long keep-alive: pooled test clients never race the server closing idle sockets.
            config = uvicorn.Config(
                build_app(daemon),
                log_config=None,
                access_log=False,
                lifespan="on",
                timeout_keep_alive=65,
            )
            server = uvicorn.Server(config)
            holder["server"] = server
            holder["loop"] = asyncio.get_running_loop()
            serve = asyncio.create_task(server.serve(sockets=[sock]))
            while not server.started and not serve.done():
                await asyncio.sleep(0.01)
            ready.set()
            await serve
        except BaseException as exc:
            holder["error"] = exc
            ready.set()
            raise
        finally:
            await daemon.close(drain_timeout=30)

    thread = threading.Thread(target=lambda: asyncio.run(main()), name="live-rebuildd", daemon=True)
    thread.start()
    if not ready.wait(timeout=60) or "error" in holder:
        raise RuntimeError(f"live rebuildd did not start: {holder.get('error')}")
    host, port = sock.getsockname()
    url = f"http://{host}:{port}"
    return LiveDaemon(
        settings=settings,
        url=url,
        client=httpx.Client(base_url=url, timeout=30),
        image_ids=holder["images"],
        daemon=holder["daemon"],
        _server=holder["server"],
        _thread=thread,
        _loop=holder["loop"],
    )


class Gate:
    """A step observer that holds a job at one step until released (a test hook)."""

    def __init__(self, step: str, job: str = "rebuild") -> None:
        self.step = step
        self.job = job
        self.reached = threading.Event()
        self.release = threading.Event()
        self.fail_with: Exception | None = None

    async def before_step(self, job: str, step: str, server_id: str) -> None:
        if (job, step) == (self.job, self.step):
            self.reached.set()
            if self.fail_with is not None:
                raise self.fail_with
            while not self.release.is_set():
                await asyncio.sleep(0.01)

    async def after_step(self, job: str, step: str, server_id: str) -> None:
        return None
