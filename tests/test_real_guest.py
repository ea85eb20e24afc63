"""A real guest on real libvirtd + QEMU (``make test``): the tiny Linux of scripts/tinyguest.sh
reports on its serial console what it sees (image tag, root disk, config drive, volumes,
ephemeral disk, power-off), and each test asserts a rebuild's promise from those lines.

The daemon runs with ``domain_type=auto``: on a host whose /dev/kvm cannot run a real OS (PVM)
the guests boot only because auto chose TCG. Tests run one after another and delete their
servers, so at most two guests boot at a time.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import re
import shutil
import signal
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog

from rebuildd import domxml
from rebuildd.hypervisor import LibvirtHypervisor
from tests.conftest import require
from tests.live import LiveDaemon, start_live_daemon
from tests.process import DaemonProcess

libvirt = pytest.importorskip("libvirt")
pytestmark = pytest.mark.qemu

URI = "qemu:///system"
ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "scripts" / "tinyguest.sh"
HOST_TOOLS = ("syslinux", "mcopy", "mkfs.fat", "sfdisk", "apt-get", "dpkg-deb")
SHUTDOWN_TIMEOUT = 60.0  # a clean shutdown takes well under a second; a destroy waits this long
BOOT_LIMIT = 240.0  # an upper bound for a hung boot under TCG on a busy 2-core host
PREFIX = "rebuildd-guest-"
MV = {"X-OpenStack-Nova-API-Version": "2.90"}
FLAVOR = {
    "flavor": {
        "name": "t1.guest",
        "id": "guest",
        "ram": 128,
        "vcpus": 1,
        "disk": 1,
        "OS-FLV-EXT-DATA:ephemeral": 1,
    }
}


# -- the guest's serial console -------------------------------------------------------------


@dataclass
class Boot:
    """The TINYGUEST lines of one boot (from BOOTED up to the next BOOTED)."""

    lines: list[str] = field(default_factory=list)

    def line(self, what: str) -> str:
        found = [line for line in self.lines if line.split()[1] == what]
        assert found, f"no {what} line in {self.lines}"
        return found[0]

    def fact(self, what: str, key: str) -> str:
        match = re.search(rf"\b{key}=(\S*)", self.line(what))
        assert match is not None, f"no {key}= in {self.line(what)}"
        return match.group(1)

    def facts(self, what: str, key: str) -> list[str]:
        return [
            m.group(1)
            for line in self.lines
            if line.split()[1] == what and (m := re.search(rf"\b{key}=(\S*)", line))
        ]

    def file_sha(self, name: str) -> str:
        for line in self.lines:
            if line.startswith(f"TINYGUEST CONFIGFILE {name} "):
                return line.split("sha256=")[1].split()[0]
        raise AssertionError(f"no CONFIGFILE {name} in {self.lines}")


class Console:
    """The serial console log QEMU appends to (``console_log_dir``)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def boots(self) -> list[Boot]:
        text = self.path.read_bytes().decode(errors="replace") if self.path.exists() else ""
        boots: list[Boot] = []
        for raw in text.splitlines():
            line = raw.strip("\r\x00 ")
            start = line.find("TINYGUEST ")
            if start < 0:
                continue
            line = line[start:]
            if line.startswith("TINYGUEST BOOTED "):
                boots.append(Boot())
            if boots and len(line.split()) > 1:
                boots[-1].lines.append(line)
        return boots

    def ready(self, count: int) -> Boot:
        """The ``count``-th boot, once it has printed READY."""
        deadline = time.monotonic() + BOOT_LIMIT
        while time.monotonic() < deadline:
            boots = self.boots()
            if len(boots) >= count and any(
                line.startswith("TINYGUEST READY") for line in boots[count - 1].lines
            ):
                return boots[count - 1]
            time.sleep(0.1)
        raise AssertionError(f"boot {count} never got READY: {self.boots()}")


# -- fixtures ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class GuestImages:
    a: Path
    b: Path


def build_guest_images() -> GuestImages:
    """scripts/tinyguest.sh's two images (built once from Debian packages, then cached by the
    script); skips where the build tools or libvirtd are absent."""
    missing = [tool for tool in HOST_TOOLS if shutil.which(tool) is None]
    if missing:
        require("the tiny guest's build tools", f"missing {', '.join(missing)}")
    try:
        conn = libvirt.open(URI)
        conn.close()
    except libvirt.libvirtError as exc:
        require("libvirtd with the QEMU driver", str(exc))
    built = subprocess.run([str(BUILD)], check=False, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    out = Path(built.stdout.strip().splitlines()[-1])
    return GuestImages(out / "tinyguest-A.raw", out / "tinyguest-B.raw")


@pytest.fixture(scope="session")
def guest_images() -> GuestImages:
    return build_guest_images()


def upload(client: httpx.Client, name: str, path: Path) -> str:
    """Create and upload an image through rebuildd's image API, as any user would."""
    response = client.post(
        "/image/v2/images",
        json={"name": name, "disk_format": "raw", "container_format": "bare"},
    )
    assert response.status_code == 201, response.text
    image_id: str = response.json()["id"]
    with path.open("rb") as data:
        response = client.put(
            f"/image/v2/images/{image_id}/file",
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        )
    assert response.status_code == 204, response.text
    assert client.get(f"/image/v2/images/{image_id}").json()["status"] == "active"
    return image_id


class PowerOffTimer:
    """Step observer: how long each rebuild's power_off step took."""

    def __init__(self) -> None:
        self.started = 0.0
        self.durations: list[float] = []

    async def before_step(self, job: str, step: str, server_id: str) -> None:
        if (job, step) == ("rebuild", "power_off"):
            self.started = time.monotonic()

    async def after_step(self, job: str, step: str, server_id: str) -> None:
        if (job, step) == ("rebuild", "power_off"):
            self.durations.append(time.monotonic() - self.started)


@dataclass
class Guests:
    live: LiveDaemon
    images: dict[str, str]  # tag -> image id
    consoles: Path
    timer: PowerOffTimer
    servers: list[str] = field(default_factory=list)

    def create(self, name: str, **extra: Any) -> tuple[str, Console]:
        body = {
            "server": {
                "name": name,
                "imageRef": self.images["A"],
                "flavorRef": "guest",
                "config_drive": True,
                "networks": "none",
                **extra,
            }
        }
        response = self.live.client.post("/v2.1/servers", json=body, headers=MV)
        assert response.status_code == 202, response.text
        server_id: str = response.json()["server"]["id"]
        self.servers.append(server_id)
        self.live.wait_for(server_id, "ACTIVE")
        return server_id, Console(self.consoles / f"{PREFIX}{server_id}.log")

    def action(self, server_id: str, body: dict[str, Any], version: str = "2.90") -> None:
        response = self.live.client.post(
            f"/v2.1/servers/{server_id}/action",
            json=body,
            headers={"X-OpenStack-Nova-API-Version": version},
        )
        assert response.status_code == 202, response.text

    def rebuild(self, server_id: str, status: str = "ACTIVE", **fields: Any) -> dict[str, Any]:
        self.action(server_id, {"rebuild": {"imageRef": self.images["B"], **fields}})
        return self.live.wait_for(server_id, status)

    def keypair(self, name: str, tmp_path: Path) -> str:
        key = tmp_path / name
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        body = {"keypair": {"name": name, "public_key": key.with_suffix(".pub").read_text()}}
        response = self.live.client.post("/v2.1/os-keypairs", json=body)
        assert response.status_code == 200, response.text
        return name


@pytest.fixture(scope="module")
def guest_daemon(
    guest_images: GuestImages, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Guests]:
    state = tmp_path_factory.mktemp("guest-daemon")
    consoles = state / "consoles"
    consoles.mkdir()
    timer = PowerOffTimer()
    live = start_live_daemon(
        state / "state",
        observer=timer,
        libvirt_uri=URI,
        domain_type="auto",
        domain_name_prefix=PREFIX,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
        console_log_dir=consoles,
    )
    try:
        assert live.client.post("/v2.1/flavors", json=FLAVOR).status_code == 200
        images = {
            "A": upload(live.client, "tinyguest-A", guest_images.a),
            "B": upload(live.client, "tinyguest-B", guest_images.b),
        }
        yield Guests(live, images, consoles, timer)
    finally:
        live.stop()


@pytest.fixture
def guests(guest_daemon: Guests) -> Iterator[Guests]:
    """The module's daemon; the servers a test made are deleted after it (one guest at a
    time runs)."""
    try:
        yield guest_daemon
    finally:
        client = guest_daemon.live.client
        for server_id in guest_daemon.servers:
            client.delete(f"/v2.1/servers/{server_id}")
        for server_id in guest_daemon.servers:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if client.get(f"/v2.1/servers/{server_id}").status_code == 404:
                    break
                time.sleep(0.1)
        guest_daemon.servers.clear()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# -- tests ------------------------------------------------------------------------------------


def test_created_guest_boots_image_a_and_reads_its_config_drive(guests: Guests) -> None:
    """A server created from A boots tag A, and its config drive names the server's uuid and
    hostname."""
    server_id, console = guests.create("guest-one", hostname="host-one")
    boot = console.ready(1)
    server = guests.live.server(server_id, **MV)
    assert boot.fact("BOOTED", "tag") == "A"
    assert boot.fact("CONFIGDRIVE", "uuid") == server_id
    assert server["OS-EXT-SRV-ATTR:hostname"] == "host-one"
    assert boot.fact("CONFIGDRIVE", "hostname") == "host-one.novalocal"  # Nova's dhcp_domain
    assert boot.fact("ROOT", "previous") == "none"


def test_rebuild_shuts_down_cleanly_and_boots_b_with_the_new_config(
    guests: Guests, tmp_path: Path
) -> None:
    """A rebuild onto B with a new name, hostname, key and user data: the guest powers off on
    the ACPI request (well before the timeout), then boots B from a fresh root disk and reads
    the new name, hostname, key and user data on its config drive."""
    old_key, new_key = guests.keypair("key-old", tmp_path), guests.keypair("key-new", tmp_path)
    server_id, console = guests.create(
        "guest-two", hostname="host-two", key_name=old_key, user_data=b64("old user data\n")
    )
    first = console.ready(1)
    assert first.fact("CONFIGDRIVE", "key") == old_key
    new_user_data = "#cloud-config\nnew user data\n"
    rebuilt_at = len(guests.timer.durations)
    guests.rebuild(
        server_id,
        name="guest-two-b",
        hostname="host-two-b",
        key_name=new_key,
        user_data=b64(new_user_data),
    )
    second = console.ready(2)
    first = console.boots()[0]

    # A clean shutdown: the guest's ACPI handler powered it off, long before the timeout.
    assert first.lines[-1].startswith("TINYGUEST POWEROFF by=acpi"), first.lines
    assert guests.timer.durations[rebuilt_at] < SHUTDOWN_TIMEOUT / 2
    # B, from a fresh root disk (no previous boot's id in it).
    assert second.fact("BOOTED", "tag") == "B"
    assert second.fact("ROOT", "previous") == "none"
    # The config drive was written anew.
    assert second.fact("CONFIGDRIVE", "uuid") == server_id
    assert second.fact("CONFIGDRIVE", "name") == "guest-two-b"
    assert second.fact("CONFIGDRIVE", "hostname") == "host-two-b.novalocal"
    assert second.fact("CONFIGDRIVE", "key") == new_key
    assert second.file_sha("user_data") == sha256(new_user_data.encode())
    assert second.file_sha("meta_data.json") != first.file_sha("meta_data.json")


def shutdowns(live: LiveDaemon) -> dict[str, float]:
    """rebuildd_guest_shutdowns_total of rebuilds, by result, from GET /metrics."""
    text = live.client.get("/metrics").text
    pattern = r'^rebuildd_guest_shutdowns_total\{action="rebuild",result="(\w+)"\} (\S+)$'
    return {m.group(1): float(m.group(2)) for m in re.finditer(pattern, text, re.M)}


def set_shutdown_timeout(live: LiveDaemon, image_id: str, value: str | None) -> None:
    """Add (or, with None, remove) the image's os_shutdown_timeout, by Glance's JSON patch."""
    op = {"op": "add", "path": "/os_shutdown_timeout", "value": value}
    if value is None:
        op = {"op": "remove", "path": "/os_shutdown_timeout"}
    response = live.client.patch(
        f"/image/v2/images/{image_id}",
        json=[op],
        headers={"Content-Type": "application/openstack-images-v2.1-json-patch"},
    )
    assert response.status_code == 200, response.text


def journal_of_last_rebuild(live: LiveDaemon, server_id: str) -> dict[str, Any]:
    """The journal the daemon kept for the server's latest rebuild, read from its database."""
    database = live.settings.state_dir / "rebuildd.db"
    with contextlib.closing(sqlite3.connect(database)) as db:
        row = db.execute(
            "SELECT journal FROM instance_actions WHERE server_id = ? AND action = 'rebuild'"
            " ORDER BY start_time DESC LIMIT 1",
            (server_id,),
        ).fetchone()
    assert row is not None and row[0], f"no rebuild journal for {server_id}"
    journal: dict[str, Any] = json.loads(row[0])
    return journal


@pytest.mark.parametrize("shutdown", ["clean", "destroyed"])
def test_the_daemon_records_how_the_rebuild_powered_the_guest_off(
    guests: Guests, shutdown: str
) -> None:
    """The daemon's records of a rebuild's power-off (the rebuild's journal and
    rebuildd_guest_shutdowns_total) say clean when the guest powered off on the ACPI request,
    destroyed when its image's os_shutdown_timeout of 0 gave it none, as the guest's console
    shows."""
    live = guests.live
    if shutdown == "destroyed":  # the server keeps the properties of the image it was made from
        set_shutdown_timeout(live, guests.images["A"], "0")
    try:
        server_id, console = guests.create(f"guest-{shutdown}")
    finally:
        if shutdown == "destroyed":
            set_shutdown_timeout(live, guests.images["A"], None)
    console.ready(1)
    before = shutdowns(live)
    guests.rebuild(server_id)
    assert console.ready(2).fact("BOOTED", "tag") == "B"
    after = shutdowns(live)
    powered_off = console.boots()[0].lines[-1].startswith("TINYGUEST POWEROFF by=acpi")
    assert powered_off == (shutdown == "clean")
    other = "destroyed" if shutdown == "clean" else "clean"
    assert after.get(shutdown, 0) == before.get(shutdown, 0) + 1
    assert after.get(other, 0) == before.get(other, 0)
    assert journal_of_last_rebuild(live, server_id)["facts"]["shutdown"] == shutdown


def test_preserve_ephemeral_keeps_the_marker_and_its_absence_blanks_it(guests: Guests) -> None:
    """preserve_ephemeral true: the marker the guest wrote before the rebuild is read after it;
    false: the ephemeral disk is blank again."""
    server_id, console = guests.create("guest-eph")
    first = console.ready(1)
    assert first.fact("EPHEMERAL", "previous") == "none"

    guests.rebuild(server_id, preserve_ephemeral=True)
    kept = console.ready(2)
    assert kept.fact("BOOTED", "tag") == "B"
    assert kept.fact("EPHEMERAL", "previous") == first.fact("BOOTED", "boot")

    guests.rebuild(server_id, preserve_ephemeral=False)
    blanked = console.ready(3)
    assert blanked.fact("EPHEMERAL", "previous") == "none"
    assert blanked.fact("ROOT", "previous") == "none"


def test_a_local_data_volume_keeps_its_serial_and_bytes(guests: Guests) -> None:
    """A local data volume shows the guest the same serial and first bytes before and after a
    rebuild."""
    live = guests.live
    project = live.settings.project_id
    response = live.client.post(
        f"/volume/v3/{project}/volumes", json={"volume": {"size": 1, "name": "data"}}
    )
    assert response.status_code == 202, response.text
    volume_id = response.json()["volume"]["id"]
    deadline = time.monotonic() + 60
    while (
        live.client.get(f"/volume/v3/{project}/volumes/{volume_id}").json()["volume"]["status"]
        != "available"
    ):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    volume_file = live.settings.state_dir / "volumes" / f"volume-{volume_id}"
    with volume_file.open("r+b") as data:  # what a user had written to the volume
        data.write(b"VOLUME-DATA-" + volume_id.encode())

    server_id, console = guests.create("guest-vol")
    console.ready(1)
    guests.action(server_id, {"os-stop": None})
    live.wait_for(server_id, "SHUTOFF")
    response = live.client.post(
        f"/v2.1/servers/{server_id}/os-volume_attachments",
        json={"volumeAttachment": {"volumeId": volume_id}},
    )
    assert response.status_code == 200, response.text
    live.wait_for(server_id, "SHUTOFF")  # the attachment is done
    guests.action(server_id, {"os-start": None})
    live.wait_for(server_id, "ACTIVE")
    before = console.ready(2)
    assert before.fact("VOLUME", "serial") == volume_id[:20]  # virtio-blk keeps 20 bytes
    assert before.fact("VOLUME", "head").startswith(f"VOLUME-DATA-{volume_id}")

    guests.rebuild(server_id)
    after = console.ready(3)
    assert after.fact("BOOTED", "tag") == "B"
    assert after.facts("VOLUME", "serial") == before.facts("VOLUME", "serial")
    assert after.facts("VOLUME", "head") == before.facts("VOLUME", "head")


def test_a_volume_backed_server_reimaged_at_2_93_boots_b(guests: Guests) -> None:
    """A server booted from a volume made from A, rebuilt onto B at 2.93: the guest boots B
    from its re-imaged root volume (no previous boot's id on it), with the config drive."""
    root = {"source_type": "image", "destination_type": "volume", "uuid": guests.images["A"],
            "boot_index": 0, "volume_size": 1, "delete_on_termination": True}  # fmt: skip
    server_id, console = guests.create("guest-bfv", imageRef="", block_device_mapping_v2=[root])
    first = console.ready(1)
    assert first.fact("BOOTED", "tag") == "A"
    guests.action(server_id, {"rebuild": {"imageRef": guests.images["B"]}}, version="2.93")
    guests.live.wait_for(server_id, "ACTIVE")
    second = console.ready(2)
    assert second.fact("BOOTED", "tag") == "B"
    assert second.fact("ROOT", "previous") == "none"
    assert second.fact("CONFIGDRIVE", "uuid") == server_id


def test_a_stopped_server_rebuilt_stays_stopped_and_boots_b_on_start(guests: Guests) -> None:
    """A stopped server rebuilt onto B stays SHUTOFF (the guest does not boot), and its next
    start boots B from a fresh root disk."""
    server_id, console = guests.create("guest-stopped")
    console.ready(1)
    guests.action(server_id, {"os-stop": None})
    guests.live.wait_for(server_id, "SHUTOFF")
    server = guests.rebuild(server_id, status="SHUTOFF")
    assert server["image"]["id"] == guests.images["B"]
    # Nova starts the rebuilt guest and stops it at once: at most a partial boot, never READY.
    boots = console.boots()
    assert all(not line.startswith("TINYGUEST READY") for b in boots[1:] for line in b.lines)
    assert guests.live.server(server_id)["OS-EXT-STS:power_state"] == 4  # SHUTDOWN
    guests.action(server_id, {"os-start": None})
    guests.live.wait_for(server_id, "ACTIVE")
    boot = console.ready(len(boots) + 1)
    assert boot.fact("BOOTED", "tag") == "B"
    assert boot.fact("ROOT", "previous") == "none"


def test_a_guest_that_powers_itself_off_is_seen_as_shutoff(guests: Guests) -> None:
    """A guest that powers itself off (its user data says so) is turned SHUTOFF by the
    power-state sync on libvirt's lifecycle event, not left ACTIVE."""
    assert guests.live.settings.power_sync_interval >= BOOT_LIMIT  # only the event can do it
    body = {
        "server": {
            "name": "guest-self-off",
            "imageRef": guests.images["A"],
            "flavorRef": "guest",
            "config_drive": True,
            "networks": "none",
            "user_data": b64("#cloud-config\ntinyguest: poweroff\n"),
        }
    }
    response = guests.live.client.post("/v2.1/servers", json=body, headers=MV)
    assert response.status_code == 202, response.text
    server_id: str = response.json()["server"]["id"]
    guests.servers.append(server_id)
    console = Console(guests.consoles / f"{PREFIX}{server_id}.log")
    boot = console.ready(1)
    deadline = time.monotonic() + BOOT_LIMIT
    while not any(line.startswith("TINYGUEST POWEROFF") for line in boot.lines):
        assert time.monotonic() < deadline, boot.lines
        time.sleep(0.1)
        boot = console.boots()[0]
    assert boot.fact("POWEROFF", "by") == "user_data"
    server = guests.live.wait_for(server_id, "SHUTOFF")
    assert server["OS-EXT-STS:vm_state"] == "stopped"
    assert server["OS-EXT-STS:power_state"] == 4  # SHUTDOWN
    assert len(console.boots()) == 1  # stopped, not restarted


# -- a daemon killed during the rebuild -------------------------------------------------------


@pytest.mark.parametrize(
    "kill_at", ["rebuild:detach_local_disks:after", "rebuild:attach_local_disks:after"]
)
def test_sigkill_during_the_rebuild_leaves_a_guest_with_a_disk(
    guest_images: GuestImages, tmp_path: Path, kill_at: str
) -> None:
    """A SIGKILL of the daemon during the rebuild: after its restart the guest comes up as A on
    its old root disk or as B on a fresh one, never without a disk."""
    consoles = tmp_path / "consoles"
    consoles.mkdir()
    daemon = DaemonProcess(
        tmp_path / "state",
        libvirt_uri=URI,
        domain_type="auto",
        domain_name_prefix=PREFIX,
        shutdown_timeout=str(SHUTDOWN_TIMEOUT),
        console_log_dir=str(consoles),
    )
    daemon.prepare()
    daemon.start(kill_at=kill_at)
    server_id = ""
    try:
        with daemon.client() as client:
            assert client.post("/v2.1/flavors", json=FLAVOR).status_code == 200
            images = {
                tag: upload(client, f"tinyguest-{tag}", path)
                for tag, path in (("A", guest_images.a), ("B", guest_images.b))
            }
            body = {
                "server": {
                    "name": "guest-kill",
                    "imageRef": images["A"],
                    "flavorRef": "guest",
                    "config_drive": True,
                    "networks": "none",
                }
            }
            response = client.post("/v2.1/servers", json=body, headers=MV)
            assert response.status_code == 202, response.text
            server_id = response.json()["server"]["id"]
        console = Console(consoles / f"{PREFIX}{server_id}.log")
        first = console.ready(1)
        with daemon.client() as client:
            response = client.post(
                f"/v2.1/servers/{server_id}/action",
                json={"rebuild": {"imageRef": images["B"]}},
            )
            assert response.status_code == 202, response.text
        assert daemon.wait_exit() == -signal.SIGKILL
        daemon.start()
        settled = wait_settled(daemon, server_id)
        assert settled["status"] in {"ACTIVE", "ERROR"}, settled
        after = console.ready(2)
        if after.fact("BOOTED", "tag") == "A":  # rolled back: the old root disk, kept
            assert after.fact("ROOT", "previous") == first.fact("BOOTED", "boot")
            assert settled["status"] == "ERROR", settled  # a failed rebuild (the default)
        else:
            assert after.fact("BOOTED", "tag") == "B"
            assert after.fact("ROOT", "previous") == "none"
    finally:
        if daemon.process is not None and daemon.process.poll() is None:
            if server_id:
                httpx.delete(f"{daemon.url}/v2.1/servers/{server_id}", timeout=30)
                wait_gone(daemon, server_id)
            daemon.stop()
        conn = libvirt.open(URI)
        try:
            dom = conn.lookupByName(f"{PREFIX}{server_id}") if server_id else None
        except libvirt.libvirtError:
            dom = None
        if dom is not None:  # the daemon died before it could delete it
            if dom.isActive():
                dom.destroy()
            dom.undefine()
        conn.close()


def wait_settled(daemon: DaemonProcess, server_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + BOOT_LIMIT
    while time.monotonic() < deadline:
        server: dict[str, Any] = daemon.get(f"/v2.1/servers/{server_id}")["server"]
        if server["OS-EXT-STS:task_state"] is None and server["status"] != "REBUILD":
            return server
        time.sleep(0.1)
    raise AssertionError("the server never settled after the restart")


def wait_gone(daemon: DaemonProcess, server_id: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if httpx.get(f"{daemon.url}/v2.1/servers/{server_id}", timeout=30).status_code == 404:
            return
        time.sleep(0.1)


# -- a KVM that cannot run the guest -----------------------------------------------------------


def test_a_kvm_guest_paused_by_an_emulation_failure_is_reported(
    guest_images: GuestImages, tmp_path: Path
) -> None:
    """Where /dev/kvm cannot run a real OS, a kvm domain that pauses with an emulation failure
    is reported (paused_by_hypervisor, and a domain_paused_by_hypervisor error in the log)."""
    if any(Path("/sys/module", m).is_dir() for m in ("kvm_intel", "kvm_amd")):
        pytest.skip("hardware KVM runs the guest: nothing pauses here")
    if not Path("/dev/kvm").exists():
        pytest.skip("no /dev/kvm: no kvm domain can start here")
    root = tmp_path / "root.raw"  # a copy: the guest writes to its root disk
    shutil.copyfile(guest_images.a, root)
    name = f"{PREFIX}kvm-{uuid.uuid4()}"
    spec = domxml.DomainSpec(
        name=name,
        uuid=str(uuid.uuid4()),
        domain_type="kvm",
        memory_mib=128,
        vcpus=1,
        disks=(domxml.DiskSpec("vda", str(root), fmt="raw"),),
        interface="none",
    )

    async def run(logs: list[MutableMapping[str, Any]]) -> bool:
        hypervisor = LibvirtHypervisor(URI, threads=1)
        await hypervisor.open()
        hypervisor.pause_watch = BOOT_LIMIT  # as on a host whose new domains are KVM's
        try:
            await hypervisor.define(domxml.to_string(domxml.build_domain(spec)))
            await hypervisor.start(name)
            deadline = time.monotonic() + BOOT_LIMIT
            while not any(e["event"] == "domain_paused_by_hypervisor" for e in logs):
                assert time.monotonic() < deadline, "the pause was never reported"
                await asyncio.sleep(0.1)
            return await hypervisor.paused_by_hypervisor(name)
        finally:
            await hypervisor.undefine(name)
            await hypervisor.close()

    with structlog.testing.capture_logs() as logs:
        assert asyncio.run(run(logs))
    reported = next(e for e in logs if e["event"] == "domain_paused_by_hypervisor")
    assert reported["domain"] == name and "emulation failure" in str(reported["reason"])
