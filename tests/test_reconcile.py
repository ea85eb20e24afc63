"""The database kept true to the hypervisor (issue 18): domains that vanish or stop behind
rebuildd's back, libvirtd restarts, restarts of rebuildd itself, readiness and systemd."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import libvirt
import pytest

from rebuildd import sdnotify
from rebuildd.powersync import correction
from rebuildd.states import PowerState
from tests.conftest import require
from tests.live import POLL_INTERVAL, POLL_LIMIT, Gate, LiveDaemon, start_live_daemon
from tests.process import DaemonProcess
from tests.test_novameta import _server as novameta_server
from tests.xmlutil import disk_source, parse

TEST_URI = "test:///default"


def _behind_the_back(action: Callable[[Any], None], name: str) -> None:
    """Act on a domain through a connection of our own, as ``virsh`` would (test:///default
    is one driver for the whole process: the daemon's and this connection see the same)."""
    conn = libvirt.open(TEST_URI)
    try:
        action(conn.lookupByName(name))
    finally:
        conn.close()


def _undefine(dom: Any) -> None:
    if dom.isActive():
        dom.destroy()
    dom.undefine()


def _until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + POLL_LIMIT
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(POLL_INTERVAL)
    raise AssertionError(f"never: {what}")


def _domain_name(live: LiveDaemon, server_id: str) -> str:
    return f"{live.settings.domain_name_prefix}{server_id}"


def _fault_message(live: LiveDaemon, server_id: str) -> str:
    faults = live.run(live.daemon.store.latest_faults([server_id]))
    return str(faults[server_id].message) if server_id in faults else ""


def _action(live: LiveDaemon, server_id: str, body: dict[str, Any]) -> httpx.Response:
    return live.client.post(f"/v2.1/servers/{server_id}/action", json=body)


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveDaemon]:
    daemon = start_live_daemon(tmp_path, power_sync_interval=0)
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def live_on_database(tmp_path: Path, database_url: str) -> Iterator[LiveDaemon]:
    """A live daemon on SQLite, then on PostgreSQL (the sync's fault goes through each's
    transition path)."""
    daemon = start_live_daemon(tmp_path, power_sync_interval=0, database_url=database_url)
    try:
        yield daemon
    finally:
        daemon.stop()


class TestPowerSync:
    def test_a_guest_destroyed_behind_the_daemon_becomes_shutoff_by_event(
        self, live: LiveDaemon
    ) -> None:
        """A guest stopped outside rebuildd turns SHUTOFF through libvirt's lifecycle event."""
        server_id = live.create_server()
        _behind_the_back(lambda dom: dom.destroy(), _domain_name(live, server_id))
        server = live.wait_for(server_id, "SHUTOFF")
        assert server["OS-EXT-STS:power_state"] == PowerState.SHUTDOWN

    def test_the_periodic_sync_stops_a_server_whose_guest_stopped(self, live: LiveDaemon) -> None:
        """Without events, one pass of the sync records a guest that stopped by itself."""
        live.daemon.hypervisor.listen(lambda _name: None)  # events go nowhere
        server_id = live.create_server()
        _behind_the_back(lambda dom: dom.destroy(), _domain_name(live, server_id))
        assert live.server(server_id)["status"] == "ACTIVE"
        assert live.run(live.daemon.powersync.sync()) == 1
        server = live.server(server_id)
        assert (server["status"], server["OS-EXT-STS:power_state"]) == ("SHUTOFF", 4)

    def test_a_vanished_domain_is_recorded_nostate_with_a_fault(
        self, live_on_database: LiveDaemon
    ) -> None:
        """An undefined domain: power_state NOSTATE, SHUTOFF and a fault naming the domain."""
        live = live_on_database
        live.daemon.hypervisor.listen(lambda _name: None)
        server_id = live.create_server()
        name = _domain_name(live, server_id)
        _behind_the_back(_undefine, name)
        live.run(live.daemon.powersync.sync())
        server = live.server(server_id)
        assert (server["status"], server["OS-EXT-STS:power_state"]) == ("SHUTOFF", 0)
        assert name in _fault_message(live, server_id)
        assert live.run(live.daemon.powersync.sync()) == 0  # once recorded, left alone

    def test_a_server_with_a_task_state_is_left_to_its_job(self, live: LiveDaemon) -> None:
        """The sync never touches a server a job holds (the swap expects no task_state)."""
        live.daemon.hypervisor.listen(lambda _name: None)
        server_id = live.create_server()
        live.run(
            live.daemon.store.transition(
                server_id, action="test", expected_task_state=(None,), task_state="powering-off"
            )
        )
        _behind_the_back(lambda dom: dom.destroy(), _domain_name(live, server_id))
        assert live.run(live.daemon.powersync.sync()) == 0
        assert live.server(server_id)["status"] == "ACTIVE"


class TestCorrection:
    """Nova's _sync_instance_power_state rules, one (vm_state, task_state, domain) at a time."""

    def _server(self, vm_state: str, power_state: int, task_state: str | None = None) -> Any:
        return dataclasses.replace(
            novameta_server(), vm_state=vm_state, power_state=power_state, task_state=task_state
        )

    def test_a_stopped_guest_of_an_active_server_stops_the_server(self) -> None:
        """ACTIVE with a shut-off or crashed guest becomes STOPPED with the guest's state."""
        for power in (PowerState.SHUTDOWN, PowerState.CRASHED):
            fix = correction(self._server("active", 1), power)
            assert fix is not None and fix.fault is None
            assert fix.changes == {"vm_state": "stopped", "power_state": power}

    def test_a_vanished_domain_gives_nostate_and_a_fault_once(self) -> None:
        """No domain: NOSTATE, STOPPED from ACTIVE, a fault; recorded already, nothing."""
        fix = correction(self._server("active", 1), None)
        assert fix is not None and fix.fault is not None
        assert fix.changes == {"vm_state": "stopped", "power_state": 0}
        stopped = correction(self._server("stopped", 4), None)
        assert stopped is not None and stopped.changes == {"power_state": 0}
        assert correction(self._server("stopped", 0), None) is None

    def test_servers_held_by_a_job_or_building_are_left_alone(self) -> None:
        """A task_state, BUILDING or DELETED: no change whatever the domain shows."""
        assert correction(self._server("active", 1, "rebuilding"), None) is None
        assert correction(self._server("building", 0), PowerState.RUNNING) is None
        assert correction(self._server("deleted", 0), None) is None

    def test_other_states_only_follow_the_power_state(self) -> None:
        """ERROR, and a paused ACTIVE guest: only power_state follows the domain."""
        fix = correction(self._server("error", 1), PowerState.SHUTDOWN)
        assert fix is not None and fix.changes == {"power_state": PowerState.SHUTDOWN}
        paused = correction(self._server("active", 1), PowerState.PAUSED)
        assert paused is not None and paused.changes == {"power_state": PowerState.PAUSED}
        assert correction(self._server("active", 1), PowerState.RUNNING) is None


class TestVanishedDomain:
    def _vanish(self, live: LiveDaemon, *, stopped: bool = False) -> tuple[str, str]:
        server_id = live.create_server()
        if stopped:
            assert _action(live, server_id, {"os-stop": None}).status_code == 202
            live.wait_for(server_id, "SHUTOFF")
        name = _domain_name(live, server_id)
        _behind_the_back(_undefine, name)
        return server_id, name

    def test_start_defines_the_domain_anew(self, live: LiveDaemon) -> None:
        """os-start of a server whose domain was undefined runs it again, defined anew."""
        server_id, name = self._vanish(live, stopped=True)
        live.poll(server_id, lambda s: s["OS-EXT-STS:power_state"] == 0, "NOSTATE")
        assert _action(live, server_id, {"os-start": None}).status_code == 202
        server = live.wait_for(server_id, "ACTIVE")
        assert server["OS-EXT-STS:power_state"] == PowerState.RUNNING
        assert live.run(live.daemon.hypervisor.find(name)) == PowerState.RUNNING

    def test_rebuild_defines_the_domain_anew(self, live: LiveDaemon) -> None:
        """A rebuild of an ACTIVE server whose domain vanished (not yet synced) succeeds."""
        live.daemon.hypervisor.listen(lambda _name: None)
        server_id, name = self._vanish(live)
        body = {"rebuild": {"imageRef": live.image_ids[1]}}
        assert _action(live, server_id, body).status_code == 202
        server = live.poll(
            server_id,
            lambda s: s["OS-EXT-STS:task_state"] is None and s["image"]["id"] == live.image_ids[1],
            "rebuilt",
        )
        assert server["status"] == "ACTIVE"
        assert live.run(live.daemon.hypervisor.find(name)) == PowerState.RUNNING


def test_a_restarted_daemon_on_the_test_driver_keeps_working(tmp_path: Path) -> None:
    """`make run` restarted: test:///default forgot the domains, the servers in ./.state are
    recorded SHUTOFF/NOSTATE, and start, rebuild and delete work again."""
    daemon = DaemonProcess(tmp_path)
    daemon.prepare()
    daemon.start()
    try:
        with daemon.client() as client:
            images = [i["id"] for i in client.get("/image/v2/images").json()["images"]]
            body = {"server": {"name": "vm", "imageRef": images[0], "flavorRef": "1"}}
            first, second = (
                client.post("/v2.1/servers", json=body).json()["server"]["id"] for _ in range(2)
            )
            for server_id in (first, second):
                _until(functools.partial(_has_status, client, server_id, ("ACTIVE", 1)), "ACTIVE")
        daemon.stop()
        daemon.start()
        with daemon.client() as client:
            for server_id in (first, second):
                _until(functools.partial(_has_status, client, server_id, ("SHUTOFF", 0)), "NOSTATE")
            assert _post(client, first, {"os-start": None}) == 202
            rebuild = {"rebuild": {"imageRef": images[0]}}
            assert _post(client, second, rebuild) == 202
            _until(lambda: _status(client, first) == ("ACTIVE", 1), "started")
            _until(lambda: _status(client, second) == ("SHUTOFF", 4), "rebuilt, stopped")
            assert client.delete(f"/v2.1/servers/{second}").status_code == 204
            _until(lambda: client.get(f"/v2.1/servers/{second}").status_code == 404, "deleted")
    finally:
        daemon.stop()


def _status(client: httpx.Client, server_id: str) -> tuple[str, int] | None:
    server = client.get(f"/v2.1/servers/{server_id}").json()["server"]
    if server["OS-EXT-STS:task_state"] is not None:
        return None
    return server["status"], server["OS-EXT-STS:power_state"]


def _has_status(client: httpx.Client, server_id: str, want: tuple[str, int]) -> bool:
    return _status(client, server_id) == want


def _post(client: httpx.Client, server_id: str, body: dict[str, Any]) -> int:
    return client.post(f"/v2.1/servers/{server_id}/action", json=body).status_code


# -- libvirtd restarted ---------------------------------------------------------------------


class PrivateLibvirtd:
    """A libvirtd of our own (an unprivileged session daemon, so the shared system libvirtd
    and its guests are untouched), serving the test driver over a real remote connection:
    it can be killed and restarted as an operator's `systemctl restart libvirtd` would."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.run_dir = root / "run"
        self.socket = self.run_dir / "libvirt" / "libvirt-sock"
        self.uri = f"test+unix:///default?socket={self.socket}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o777)
        os.chmod(self.run_dir, 0o777)
        env = {
            "PATH": os.environ["PATH"],
            "HOME": str(self.root),
            "XDG_RUNTIME_DIR": str(self.run_dir),
            "XDG_CONFIG_HOME": str(self.root / "config"),
            "XDG_CACHE_HOME": str(self.root / "cache"),
        }
        command = ["libvirtd"]
        if os.geteuid() == 0:
            command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
        log = (self.root / "libvirtd.log").open("ab")
        self.process = subprocess.Popen(command, env=env, stdout=log, stderr=log)
        _until(self._answers, "private libvirtd answers")

    def _answers(self) -> bool:
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        try:
            libvirt.open(self.uri).close()
        except libvirt.libvirtError:
            return False
        return True

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)
        with_socket = self.run_dir / "libvirt"
        shutil.rmtree(with_socket, ignore_errors=True)


@pytest.fixture
def private_libvirtd() -> Iterator[PrivateLibvirtd]:
    if shutil.which("libvirtd") is None or (os.geteuid() == 0 and not shutil.which("setpriv")):
        pytest.skip("libvirtd (and setpriv, as root) needed for a private libvirtd")
    # Not under tmp_path: pytest's directories are root's alone, and the daemon runs as nobody.
    root = Path(tempfile.mkdtemp(prefix="rebuildd-libvirtd-"))
    libvirtd = PrivateLibvirtd(root)
    libvirtd.start()
    try:
        yield libvirtd
    finally:
        libvirtd.kill()
        shutil.rmtree(root, ignore_errors=True)


def test_libvirtd_restarted_refuses_then_reconnects(
    tmp_path: Path, private_libvirtd: PrivateLibvirtd
) -> None:
    """While libvirtd is down /readyz says so and actions get 503 before the 202; once it is
    back rebuildd reconnects by itself and actions work again."""
    live = start_live_daemon(
        tmp_path / "state", libvirt_uri=private_libvirtd.uri, power_sync_interval=0
    )
    try:
        server_id = live.create_server()
        assert live.client.get("/readyz").status_code == 200
        private_libvirtd.kill()
        _until(lambda: live.client.get("/readyz").status_code == 503, "not ready")
        assert live.client.get("/readyz").json()["checks"]["libvirt"] is False
        assert live.client.get("/healthz").status_code == 200
        response = _action(live, server_id, {"os-stop": None})
        assert response.status_code == 503, response.text
        assert "libvirt" in response.json()["serviceUnavailable"]["message"]
        assert live.server(server_id)["OS-EXT-STS:task_state"] is None

        private_libvirtd.start()
        _until(lambda: live.client.get("/readyz").status_code == 200, "ready again")
        # The restarted test driver forgot the domain: the sync after the reconnect says so.
        live.poll(server_id, lambda s: s["OS-EXT-STS:power_state"] == 0, "NOSTATE")
        assert _action(live, server_id, {"os-start": None}).status_code == 202
        live.wait_for(server_id, "ACTIVE")
        assert _action(live, server_id, {"os-stop": None}).status_code == 202
        live.wait_for(server_id, "SHUTOFF")
    finally:
        live.stop()


# -- systemd and start-up ---------------------------------------------------------------------


class TestSdNotify:
    def test_messages_reach_the_notify_socket(self, tmp_path: Path) -> None:
        """notify sends its states in one datagram to NOTIFY_SOCKET."""
        path = tmp_path / "notify.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(str(path))
            assert sdnotify.notify("READY=1", "STATUS=ready", environ={"NOTIFY_SOCKET": str(path)})
            assert sock.recv(256) == b"READY=1\nSTATUS=ready"

    def test_without_a_socket_nothing_is_sent_and_nothing_raises(self, tmp_path: Path) -> None:
        """No NOTIFY_SOCKET, or one nobody listens on: False, no exception."""
        assert not sdnotify.notify("READY=1", environ={})
        assert not sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": str(tmp_path / "none")})

    def test_the_watchdog_interval_is_half_of_watchdog_usec(self) -> None:
        """WATCHDOG_USEC for this process gives half its period; for another, none."""
        mine = {"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid())}
        assert sdnotify.watchdog_interval(mine) == 5.0
        assert sdnotify.watchdog_interval({**mine, "WATCHDOG_PID": "1"}) is None
        assert sdnotify.watchdog_interval({}) is None


def test_a_restart_with_jobs_in_flight_listens_at_once(tmp_path: Path) -> None:
    """After a SIGKILL with rebuilds in flight the restarted daemon answers /healthz, tells
    systemd EXTEND_TIMEOUT_USEC/STATUS then READY=1 and then WATCHDOG=1 (WATCHDOG_USEC set),
    /readyz turns 200, and no server is left with a task_state."""
    daemon = DaemonProcess(tmp_path, max_concurrent_operations="8", shutdown_timeout="0")
    daemon.prepare()
    daemon.start(kill_at="rebuild:start_domain:before")
    with daemon.client() as client:
        images = [i["id"] for i in client.get("/image/v2/images").json()["images"]]
        body = {"server": {"name": "vm", "imageRef": images[0], "flavorRef": "1"}}
        ids = [client.post("/v2.1/servers", json=body).json()["server"]["id"] for _ in range(6)]
        for server_id in ids:
            _until(functools.partial(_has_status, client, server_id, ("ACTIVE", 1)), "ACTIVE")
        rebuild = {"rebuild": {"imageRef": images[1]}}
        with concurrent.futures.ThreadPoolExecutor(len(ids)) as pool:
            for future in [pool.submit(_post, client, s, rebuild) for s in ids]:
                with contextlib.suppress(httpx.TransportError):  # killed
                    future.result()
    assert daemon.wait_exit() == -9

    notify_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(60)
        daemon.env["NOTIFY_SOCKET"] = str(notify_path)
        daemon.env["WATCHDOG_USEC"] = "400000"  # as systemd sets it for WatchdogSec=0.4
        daemon.start(ready=False)
        assert httpx.get(f"{daemon.url}/healthz", timeout=5).status_code == 200
        messages = []
        while b"READY=1" not in (message := notify.recv(256)):
            messages.append(message)
        while notify.recv(256) != b"WATCHDOG=1":
            pass
    assert any(b"EXTEND_TIMEOUT_USEC=" in m and b"STATUS=recovering" in m for m in messages)
    assert httpx.get(f"{daemon.url}/readyz", timeout=5).status_code == 200
    try:
        with daemon.client() as client:
            for server_id in ids:
                server = client.get(f"/v2.1/servers/{server_id}").json()["server"]
                assert server["OS-EXT-STS:task_state"] is None, server
    finally:
        daemon.stop()


def test_servers_under_recovery_answer_409_and_readyz_flips_when_done(tmp_path: Path) -> None:
    """While a rebuild left in flight is still being recovered the API already answers: the
    server gets 409, /healthz 200 and /readyz 503; once recovery ends /readyz is 200."""
    killed = DaemonProcess(tmp_path)
    killed.prepare()
    killed.start(kill_at="rebuild:restore_power_state:before")
    with killed.client() as client:
        images = [i["id"] for i in client.get("/image/v2/images").json()["images"]]
        body = {"server": {"name": "vm", "imageRef": images[0], "flavorRef": "1"}}
        server_id = client.post("/v2.1/servers", json=body).json()["server"]["id"]
        _until(functools.partial(_has_status, client, server_id, ("ACTIVE", 1)), "ACTIVE")
        with contextlib.suppress(httpx.TransportError):
            _post(client, server_id, {"rebuild": {"imageRef": images[1]}})
    assert killed.wait_exit() == -9

    gate = Gate("restore_power_state")  # the roll-forward waits here: recovery is not done
    live = start_live_daemon(tmp_path, observer=gate)
    try:
        assert gate.reached.wait(POLL_LIMIT)
        assert live.client.get("/healthz").status_code == 200
        ready = live.client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["recovery"] is False
        assert _action(live, server_id, {"os-stop": None}).status_code == 409
        gate.release.set()
        _until(lambda: live.client.get("/readyz").status_code == 200, "ready")
    finally:
        gate.release.set()
        live.stop()


# -- real QEMU --------------------------------------------------------------------------------

QEMU_URI = "qemu:///system"


@pytest.fixture
def qemu_live(tmp_path: Path) -> Iterator[tuple[LiveDaemon, Any]]:
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        conn = libvirt.open(QEMU_URI)
    except libvirt.libvirtError as exc:
        require("libvirtd with the QEMU driver", str(exc))
    live = start_live_daemon(
        tmp_path,
        libvirt_uri=QEMU_URI,
        domain_type="qemu",
        domain_name_prefix="rebuildd-test-",
        shutdown_timeout=1.0,
        power_sync_interval=0,
    )
    flavor = {"flavor": {"name": "t1.qemu", "id": "qemu", "ram": 128, "vcpus": 1, "disk": 1}}
    assert live.client.post("/v2.1/flavors", json=flavor).status_code == 200
    try:
        yield live, conn
    finally:
        for server in live.client.get("/v2.1/servers").json()["servers"]:
            live.client.delete(f"/v2.1/servers/{server['id']}")
        _until(lambda: not live.client.get("/v2.1/servers").json()["servers"], "all deleted")
        live.stop()
        conn.close()


@pytest.mark.qemu
def test_qemu_guest_destroyed_then_undefined_behind_the_daemon(
    qemu_live: tuple[LiveDaemon, Any],
) -> None:
    """On QEMU: a guest destroyed outside rebuildd turns SHUTOFF by event; undefined, it is
    recorded NOSTATE; os-start defines it anew on the same root disk and it runs again."""
    live, conn = qemu_live
    server_id = live.create_server(flavor="qemu")
    name = f"rebuildd-test-{server_id}"
    root = disk_source(parse(conn.lookupByName(name).XMLDesc(0)), "vda")
    conn.lookupByName(name).destroy()
    assert live.wait_for(server_id, "SHUTOFF")["OS-EXT-STS:power_state"] == PowerState.SHUTDOWN
    conn.lookupByName(name).undefine()
    live.poll(server_id, lambda s: s["OS-EXT-STS:power_state"] == 0, "NOSTATE")
    assert name in _fault_message(live, server_id)
    assert _action(live, server_id, {"os-start": None}).status_code == 202
    assert live.wait_for(server_id, "ACTIVE")["OS-EXT-STS:power_state"] == PowerState.RUNNING
    dom = conn.lookupByName(name)
    assert dom.isActive()
    assert disk_source(parse(dom.XMLDesc(0)), "vda") == root
