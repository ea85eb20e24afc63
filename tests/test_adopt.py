"""``rebuildd adopt`` on real libvirtd + QEMU: domains defined by hand (one a plain guest, one
shaped as Nova makes them) become rebuildd servers with the right block devices and flavor,
are adopted only once, and can then be rebuilt by a live daemon like any other server."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from rebuildd import adopt, errors
from rebuildd.models import BlockDevice, Flavor, InstanceAction, Server
from rebuildd.storage import ServerFilters, Store, create_engine
from tests.conftest import require
from tests.live import start_live_daemon
from tests.xmlutil import REBUILDD_NS, backing_file, disk_source

libvirt = pytest.importorskip("libvirt")
URI = "qemu:///system"
HOST = "adopt-test-host"
NOVA_NS = "http://openstack.org/xmlns/libvirt/nova/1.1"
REBUILDD = Path(sys.executable).with_name("rebuildd")
NOVA_PROJECT = "e1d2c3b4a5f64e7d8c9b0a1f2e3d4c5b"
NOVA_USER = "5a4b3c2d1e0f4a9b8c7d6e5f4a3b2c1d"
NOVA_IMAGE = "1d2c3b4a-5e6f-4a7b-8c9d-0e1f2a3b4c5d"
# The disks Nova made in its instance directory, which rebuildd owns once it adopts them.
NOVA_FILES = {"vda": "disk", "vdb": "disk.eph0", "vdc": "disk.swap", "hdd": "disk.config"}


def _sub(parent: etree._Element, tag: str, text: str | None = None, **attrs: str) -> Any:
    child = etree.SubElement(parent, tag, attrs)
    child.text = text
    return child


def _qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


@dataclass
class Host:
    """Defines domains on qemu:///system for one test and removes them afterwards."""

    conn: Any
    tmp: Path
    names: list[str] = field(default_factory=list)

    def name(self, tag: str) -> str:
        return f"rebuildd-adopt-test-{tag}-{uuid.uuid4().hex[:8]}"

    def define(self, root: etree._Element) -> Any:
        dom = self.conn.defineXML(etree.tostring(root, encoding="unicode"))
        self.names.append(dom.name())
        return dom

    def xml(self, name: str) -> etree._Element:
        dom = self.conn.lookupByName(name)
        return etree.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).encode())

    def cleanup(self) -> None:
        for name in self.names:
            try:
                dom = self.conn.lookupByName(name)
            except libvirt.libvirtError:
                continue
            if dom.isActive():
                dom.destroy()
            dom.undefine()

    def plain(self, tag: str = "plain") -> Any:
        """A guest made by hand: a qcow2 root disk on vda, a NIC with a MAC, VNC, serial."""
        name = self.name(tag)
        root_disk = self.tmp / name / "root.qcow2"
        root_disk.parent.mkdir(parents=True)
        _qemu_img("create", "-q", "-f", "qcow2", str(root_disk), "64M")
        domain = self._skeleton(name, str(uuid.uuid4()), memory_kib=131072)
        devices = domain.find("devices")
        self._disk(devices, root_disk, "vda", "virtio", fmt="qcow2")
        self._common_devices(devices, mac="52:54:00:12:34:56")
        return self.define(domain)

    def nova(self, flavor_name: str) -> tuple[Any, str]:
        """A guest shaped as Nova makes one: nova:instance metadata, disk/disk.eph0/disk.swap
        in an instance directory, an iso9660 config drive on hdd (IDE), a volume on vdd."""
        name = self.name("nova")
        server_id = str(uuid.uuid4())
        home = self.tmp / "nova" / server_id
        home.mkdir(parents=True)
        _qemu_img("create", "-q", "-f", "qcow2", str(home / "disk"), "1G")
        _qemu_img("create", "-q", "-f", "qcow2", str(home / "disk.eph0"), "1G")
        _qemu_img("create", "-q", "-f", "qcow2", str(home / "disk.swap"), "16M")
        _qemu_img("create", "-q", "-f", "raw", str(home / "disk.config"), "1M")
        volume = self.tmp / "volumes" / f"volume-{uuid.uuid4()}"
        volume.parent.mkdir(exist_ok=True)
        _qemu_img("create", "-q", "-f", "raw", str(volume), "8M")

        domain = self._skeleton(name, server_id, memory_kib=131072, machine="pc")
        metadata = _sub(domain, "metadata")
        domain.find("uuid").addnext(metadata)  # type: ignore[union-attr]
        metadata.append(_nova_metadata(flavor_name))
        devices = domain.find("devices")
        self._disk(devices, home / "disk", "vda", "virtio", fmt="qcow2")
        self._disk(devices, home / "disk.eph0", "vdb", "virtio", fmt="qcow2")
        self._disk(devices, home / "disk.swap", "vdc", "virtio", fmt="qcow2")
        self._disk(devices, volume, "vdd", "virtio", fmt="raw", serial=str(uuid.uuid4()))
        self._disk(devices, home / "disk.config", "hdd", "ide", fmt="raw", device="cdrom")
        self._common_devices(devices, mac="fa:16:3e:12:34:56", interface="ethernet")
        cpu = etree.Element("cpu", mode="custom", match="exact")
        _sub(cpu, "model", "qemu64", fallback="allow")
        domain.find("os").addnext(cpu)  # type: ignore[union-attr]
        return self.define(domain), server_id

    @staticmethod
    def _skeleton(
        name: str, server_id: str, *, memory_kib: int, machine: str | None = None
    ) -> etree._Element:
        domain = etree.Element("domain", type="qemu")  # TCG: an OS-less guest idles
        _sub(domain, "name", name)
        _sub(domain, "uuid", server_id)
        _sub(domain, "memory", str(memory_kib), unit="KiB")
        _sub(domain, "vcpu", "1")
        os_el = _sub(domain, "os")
        _sub(os_el, "type", "hvm", arch="x86_64", **({"machine": machine} if machine else {}))
        _sub(os_el, "boot", dev="hd")
        features = _sub(domain, "features")
        _sub(features, "acpi")
        _sub(domain, "devices")
        return domain

    @staticmethod
    def _disk(
        devices: Any,
        path: Path,
        target: str,
        bus: str,
        *,
        fmt: str,
        device: str = "disk",
        serial: str | None = None,
    ) -> None:
        disk = _sub(devices, "disk", type="file", device=device)
        _sub(disk, "driver", name="qemu", type=fmt, cache="none")
        _sub(disk, "source", file=str(path))
        _sub(disk, "target", dev=target, bus=bus)
        if device == "cdrom":
            _sub(disk, "readonly")
        if serial:
            _sub(disk, "serial", serial)

    @staticmethod
    def _common_devices(devices: Any, *, mac: str, interface: str = "user") -> None:
        iface = _sub(devices, "interface", type=interface)
        _sub(iface, "mac", address=mac)
        _sub(iface, "model", type="virtio")
        serial = _sub(devices, "serial", type="pty")
        _sub(serial, "target", port="0")
        _sub(devices, "graphics", type="vnc", port="-1", autoport="yes", listen="127.0.0.1")


def _nova_metadata(flavor_name: str) -> etree._Element:
    def n(tag: str) -> str:
        return f"{{{NOVA_NS}}}{tag}"

    instance = etree.Element(n("instance"), nsmap={"nova": NOVA_NS})
    _sub(instance, n("package"), version="27.1.0")
    _sub(instance, n("name"), "web-1")
    _sub(instance, n("creationTime"), "2024-03-05 10:11:12")
    flavor = _sub(instance, n("flavor"), name=flavor_name)
    for tag, value in (("memory", 128), ("disk", 1), ("swap", 16), ("ephemeral", 1), ("vcpus", 1)):
        _sub(flavor, n(tag), str(value))
    owner = _sub(instance, n("owner"))
    _sub(owner, n("user"), "alice", uuid=NOVA_USER)
    _sub(owner, n("project"), "web", uuid=NOVA_PROJECT)
    _sub(instance, n("root"), type="image", uuid=NOVA_IMAGE)
    return instance


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    try:
        conn = libvirt.open(URI)
    except libvirt.libvirtError as exc:
        require("libvirtd with the QEMU driver", str(exc))
        raise
    qemu = Host(conn, tmp_path / "guests")
    qemu.tmp.mkdir()
    try:
        yield qemu
    finally:
        qemu.cleanup()
        conn.close()


def run_adopt(state: Path, *args: str, uri: str = URI) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "REBUILDD_STATE_DIR": str(state),
        "REBUILDD_LIBVIRT_URI": uri,
        "REBUILDD_HOST": HOST,
        "REBUILDD_PROJECT_ID": "ops",
        "REBUILDD_USER_ID": "operator",
        "REBUILDD_LOG_LEVEL": "warning",
    }
    return subprocess.run(
        [str(REBUILDD), "adopt", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@dataclass
class Recorded:
    servers: list[Server]
    devices: dict[str, list[BlockDevice]]
    actions: dict[str, list[InstanceAction]]

    def one(self, server_id: str) -> tuple[Server, dict[str, BlockDevice]]:
        server = next(s for s in self.servers if s.id == server_id)
        return server, {d.device_name: d for d in self.devices[server_id]}


def recorded(state: Path) -> Recorded:
    async def read() -> Recorded:
        store = Store(create_engine(f"sqlite+aiosqlite:///{state / 'rebuildd.db'}"))
        try:
            servers = await store.list_servers(ServerFilters())
            devices = {s.id: await store.get_block_devices(s.id) for s in servers}
            actions = {s.id: await store.list_actions(s.id) for s in servers}
            return Recorded(servers, devices, actions)
        finally:
            await store.close()

    return asyncio.run(read())


def _without_ours(root: etree._Element) -> str:
    """The document without the metadata adopting writes: rebuildd's, and Nova's for a domain
    that had none (a hand-made one)."""
    copy = etree.fromstring(etree.tostring(root))
    metadata = copy.find("metadata")
    if metadata is not None:
        for ours in metadata.findall(f"{{{REBUILDD_NS}}}instance"):
            metadata.remove(ours)
        for nova in metadata.findall("{http://openstack.org/xmlns/libvirt/nova/1.1}instance"):
            metadata.remove(nova)
        if len(metadata) == 0:
            copy.remove(metadata)
    return str(etree.canonicalize(etree.tostring(copy, encoding="unicode"), strip_text=True))


@pytest.mark.qemu
def test_a_running_hand_made_domain_is_adopted(host: Host, tmp_path: Path) -> None:
    """Its uuid, name, power state and root disk make the server; a flavor is made for it;
    the domain keeps running, and only rebuildd's metadata is added to its definition."""
    dom = host.plain()
    dom.create()
    before = host.xml(dom.name())

    result = run_adopt(tmp_path / "state", dom.name())

    assert result.returncode == 0, result.stderr
    server_id = dom.UUIDString()
    assert result.stdout.splitlines() == [
        f"adopted {dom.name()} as server {server_id} (flavor adopted-1c-128m-1g)"
    ]
    server, devices = recorded(tmp_path / "state").one(server_id)
    assert (server.name, server.domain_name, server.hostname) == (dom.name(),) * 3
    assert (server.vm_state, server.task_state, server.power_state) == ("active", None, 1)
    assert (server.host, server.node, server.project_id, server.user_id) == (
        HOST,
        HOST,
        "ops",
        "operator",
    )
    assert server.launched_at is not None and server.image_ref == ""
    flavor = server.flavor
    assert (flavor.vcpus, flavor.ram, flavor.disk, flavor.ephemeral, flavor.swap) == (
        1,
        128,
        1,
        0,
        0,
    )
    (root,) = devices.values()
    assert (root.device_name, root.boot_index, root.source_type, root.destination_type) == (
        "vda",
        0,
        "image",
        "local",
    )
    assert (root.path, root.disk_bus, root.owned) == (
        str(host.tmp / dom.name() / "root.qcow2"),
        "virtio",
        True,
    )
    (action,) = recorded(tmp_path / "state").actions[server_id]
    assert (action.action, action.job_state, action.user_id) == ("adopt", None, "operator")

    assert dom.isActive()
    after = host.xml(dom.name())
    assert _without_ours(after) == _without_ours(before)
    ours = after.find(f"metadata/{{{REBUILDD_NS}}}instance")
    assert ours is not None
    assert ours.findtext(f"{{{REBUILDD_NS}}}server") == server_id
    nova = after.find("metadata/{http://openstack.org/xmlns/libvirt/nova/1.1}instance")
    assert nova is not None, "the adopted domain now describes itself in Nova's terms too"


@pytest.mark.qemu
def test_nova_metadata_names_the_server_and_its_flavor(host: Host, tmp_path: Path) -> None:
    """Name, owner, image, creation time and flavor come from nova:instance; ephemeral, swap
    and config drive are Nova's disks, the volume is recorded and not owned."""
    flavor_name = f"m1.nova-{uuid.uuid4().hex[:6]}"
    dom, server_id = host.nova(flavor_name)

    result = run_adopt(tmp_path / "state", dom.name())

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"adopted {dom.name()} as server {server_id} (flavor {flavor_name})"
    )
    server, devices = recorded(tmp_path / "state").one(server_id)
    assert (server.name, server.project_id, server.user_id) == ("web-1", NOVA_PROJECT, NOVA_USER)
    assert (server.image_ref, server.vm_state, server.power_state) == (NOVA_IMAGE, "stopped", 4)
    assert server.created_at.isoformat() == "2024-03-05T10:11:12+00:00"
    (action,) = recorded(tmp_path / "state").actions[server_id]
    assert action.start_time == server.launched_at  # when it was adopted, not created
    assert server.config_drive
    flavor = server.flavor
    assert (flavor.name, flavor.vcpus, flavor.ram, flavor.disk) == (flavor_name, 1, 128, 1)
    assert (flavor.ephemeral, flavor.swap) == (1, 16)
    summary = {
        target: (d.boot_index, d.source_type, d.guest_format, d.size_mib, d.device_type, d.owned)
        for target, d in devices.items()
    }
    assert summary == {
        "vda": (0, "image", None, None, "disk", True),
        "vdb": (None, "blank", "ext4", 1024, "disk", True),
        "vdc": (None, "blank", "swap", 16, "disk", True),
        "vdd": (None, "blank", None, None, "disk", False),
        "hdd": (None, "blank", "iso9660", None, "cdrom", True),
    }
    assert devices["vda"].image_id == NOVA_IMAGE
    assert devices["hdd"].disk_bus == "ide"


@pytest.mark.qemu
def test_a_domain_is_adopted_once(host: Host, tmp_path: Path) -> None:
    """Adopting a known domain again is refused on stderr (exit 1: nothing adopted); a name
    that is no domain fails the command even when another domain was adopted."""
    first, second = host.plain("once"), host.plain("twice")
    state = tmp_path / "state"
    assert run_adopt(state, first.name()).returncode == 0

    again = run_adopt(state, first.name())
    assert again.returncode == 1
    assert again.stdout == ""
    assert again.stderr.strip().endswith(
        f"not adopted {first.name()}: it is already the domain of server {first.UUIDString()}"
    )

    missing = "rebuildd-adopt-test-no-such-domain"
    mixed = run_adopt(state, first.name(), second.name(), missing)
    assert mixed.returncode == 1
    assert mixed.stdout.splitlines() == [
        f"adopted {second.name()} as server {second.UUIDString()} (flavor adopted-1c-128m-1g)"
    ]
    assert f"not adopted {missing}: no such domain" in mixed.stderr
    assert len(recorded(state).servers) == 2


@pytest.mark.qemu
def test_domains_rebuildd_could_not_rebuild_are_refused(host: Host, tmp_path: Path) -> None:
    """A root disk on Ceph RBD (not a file), a paused guest and a transient one (a rebuild's
    define would make it persistent) are refused on stderr; nothing is recorded, not even a
    flavor, and the exit status is 1."""
    rbd = etree.fromstring(etree.tostring(host.xml(host.plain("rbd").name())))
    disk = rbd.find("devices/disk")
    assert disk is not None
    disk.set("type", "network")
    source = disk.find("source")
    assert source is not None
    del source.attrib["file"]
    source.set("protocol", "rbd")
    source.set("name", "vms/root")
    _sub(source, "host", name="192.0.2.20", port="6789")
    network_root = host.conn.defineXML(etree.tostring(rbd, encoding="unicode"))
    paused = host.plain("paused")
    paused.create()
    paused.suspend()
    transient = host.plain("transient")
    transient.create()
    transient.undefine()  # running, with no persistent definition left
    try:
        result = run_adopt(tmp_path / "state", network_root.name(), paused.name(), transient.name())
    finally:
        transient.destroy()  # gone with it

    assert (result.returncode, result.stdout) == (1, "")
    assert f"not adopted {network_root.name()}: it has no file-backed root disk" in result.stderr
    assert f"not adopted {paused.name()}: it is neither running nor shut off" in result.stderr
    assert f"not adopted {transient.name()}: it is transient" in result.stderr
    assert recorded(tmp_path / "state").servers == []

    async def flavors() -> list[str]:
        store = Store(create_engine(f"sqlite+aiosqlite:///{tmp_path / 'state' / 'rebuildd.db'}"))
        try:
            return [f.name for f in await store.list_flavors()]
        finally:
            await store.close()

    assert asyncio.run(flavors()) == []


def _test_node(tmp: Path, names: list[str]) -> str:
    """A libvirt test-driver host whose domains have real qcow2 root disks: ``--all`` looks
    at every domain of a host, and on qemu:///system that would include others' guests."""
    node = etree.Element("node")
    for name in names:
        disk_file = tmp / f"{name}.qcow2"
        _qemu_img("create", "-q", "-f", "qcow2", str(disk_file), "64M")
        domain = _sub(node, "domain", type="test")
        _sub(domain, "name", name)
        _sub(domain, "uuid", str(uuid.uuid4()))
        _sub(domain, "memory", "131072")
        _sub(domain, "vcpu", "1")
        _sub(_sub(domain, "os"), "type", "hvm")
        disk = _sub(_sub(domain, "devices"), "disk", type="file", device="disk")
        _sub(disk, "driver", name="qemu", type="qcow2")  # libvirt reads a disk without one as raw
        _sub(disk, "source", file=str(disk_file))
        _sub(disk, "target", dev="vda", bus="virtio")
    path = tmp / "node.xml"
    path.write_bytes(etree.tostring(node))
    return f"test://{path}"


def test_all_adopts_only_the_domains_not_known_yet(tmp_path: Path) -> None:
    """--all skips known domains silently and adopts the rest; once all are known it has
    nothing to do and says so (exit 0)."""
    names = ["rebuildd-adopt-test-all-a", "rebuildd-adopt-test-all-b", "rebuildd-adopt-test-all-c"]
    uri = _test_node(tmp_path, names)
    state = tmp_path / "state"
    assert run_adopt(state, names[1], uri=uri).returncode == 0

    everything = run_adopt(state, "--all", uri=uri)

    assert everything.returncode == 0, everything.stderr
    adopted = [line.split()[1] for line in everything.stdout.splitlines()]
    assert sorted(adopted) == [names[0], names[2]]
    assert "not adopted" not in everything.stderr
    assert sorted(s.domain_name for s in recorded(state).servers) == names

    nothing = run_adopt(state, "--all", uri=uri)
    assert (nothing.returncode, nothing.stdout) == (0, "")
    assert "no domain left to adopt" in nothing.stderr


def test_the_command_wants_names_or_all_but_not_both(tmp_path: Path) -> None:
    """A usage error (exit 2) without DOMAIN and --all, or with both."""
    assert run_adopt(tmp_path, uri="test:///default").returncode == 2
    assert run_adopt(tmp_path, "--all", "x", uri="test:///default").returncode == 2


@pytest.mark.qemu
def test_an_adopted_nova_guest_is_rebuilt(host: Host, tmp_path: Path) -> None:
    """A running Nova-made guest, adopted, is rebuilt by a live daemon onto a demo image: it
    runs again on a new overlay of that image, its ephemeral and swap disks and config drive
    made anew beside it, Nova's files gone; the volume and every other device untouched."""
    dom, server_id = host.nova(f"m1.nova-{uuid.uuid4().hex[:6]}")
    dom.create()
    state = tmp_path / "state"
    assert run_adopt(state, dom.name()).returncode == 0
    before = host.xml(dom.name())
    nova_files = [host.tmp / "nova" / server_id / f for f in NOVA_FILES.values()]

    live = start_live_daemon(
        state, libvirt_uri=URI, domain_type="qemu", shutdown_timeout=1.0, host=HOST
    )
    try:
        response = live.client.post(
            f"/v2.1/servers/{server_id}/action",
            json={"rebuild": {"imageRef": live.image_ids[0], "name": "web-1-rebuilt"}},
        )
        assert response.status_code == 202, response.text
        server = live.wait_for(server_id, "ACTIVE")
        events = live.client.get(f"/v2.1/servers/{server_id}/os-instance-actions").json()
    finally:
        live.stop()

    assert (server["name"], server["image"]["id"]) == ("web-1-rebuilt", live.image_ids[0])
    assert [a["action"] for a in events["instanceActions"]] == ["rebuild", "adopt"]
    assert dom.isActive()
    after = host.xml(dom.name())
    new_files = {target: disk_source(after, target) for target in NOVA_FILES}
    assert all(f.parent == state / "instances" / server_id for f in new_files.values())
    assert all(f.exists() for f in new_files.values())
    assert backing_file(new_files["vda"]) == state / "_base" / live.image_ids[0]
    assert [f for f in nova_files if f.exists()] == []  # removed once the guest had started
    _, devices = recorded(state).one(server_id)
    assert {t: devices[t].path for t in NOVA_FILES} == {t: str(f) for t, f in new_files.items()}
    assert devices["vda"].image_id == live.image_ids[0]

    def unowned(root: etree._Element) -> list[bytes]:
        return [
            etree.tostring(d, with_tail=False)
            for d in root.iterfind("devices/disk")
            if d.find("target").get("dev", "") not in NOVA_FILES  # type: ignore[union-attr]
        ]

    assert len(unowned(after)) == 1 and unowned(after) == unowned(before)
    for tag in ("interface", "serial", "graphics", "input", "video", "memballoon"):
        assert [etree.tostring(e, with_tail=False) for e in after.iterfind(f"devices/{tag}")] == [
            etree.tostring(e, with_tail=False) for e in before.iterfind(f"devices/{tag}")
        ], tag
    for tag in ("cpu", "os", "features", "memory", "vcpu"):
        old, new = before.find(tag), after.find(tag)
        assert old is not None and new is not None
        assert etree.tostring(new, with_tail=False) == etree.tostring(old, with_tail=False), tag


@pytest.mark.qemu
def test_deleting_an_adopted_guest_removes_its_own_disks_and_keeps_the_volume(
    host: Host, tmp_path: Path
) -> None:
    """Deleted without ever being rebuilt, an adopted Nova guest takes its own disk files with
    it, wherever they were; the volume rebuildd does not own stays."""
    dom, server_id = host.nova(f"m1.nova-{uuid.uuid4().hex[:6]}")
    state = tmp_path / "state"
    assert run_adopt(state, dom.name()).returncode == 0
    nova_files = [host.tmp / "nova" / server_id / f for f in NOVA_FILES.values()]
    volume = disk_source(host.xml(dom.name()), "vdd")
    assert all(f.exists() for f in nova_files) and volume.exists()

    live = start_live_daemon(
        state, libvirt_uri=URI, domain_type="qemu", shutdown_timeout=1.0, host=HOST
    )
    try:
        assert live.client.delete(f"/v2.1/servers/{server_id}").status_code == 204
        deadline = time.monotonic() + 30
        while live.client.get(f"/v2.1/servers/{server_id}").status_code != 404:
            assert time.monotonic() < deadline, "never deleted"
            time.sleep(0.05)
    finally:
        live.stop()
    assert [f for f in nova_files if f.exists()] == []
    assert volume.exists()


def _domain_xml(*disks: tuple[str, str], uuid_text: str = "", nova: bool = False) -> Any:
    """A parsed domain with file disks (target, path) and, optionally, Nova's metadata with
    an ephemeral disk in its flavor."""
    domain = Host._skeleton(
        "rebuildd-adopt-test-pure", uuid_text or str(uuid.uuid4()), memory_kib=1
    )
    domain.find("memory").set("unit", "GiB")  # type: ignore[union-attr]
    if nova:
        metadata = etree.Element("metadata")
        domain.find("uuid").addnext(metadata)  # type: ignore[union-attr]
        metadata.append(_nova_metadata("m1.pure"))
    for target, path in disks:
        Host._disk(domain.find("devices"), Path(path), target, "virtio", fmt="qcow2")
    return domain


class TestReading:
    """adopt's pure reading of a domain, for what a real libvirtd cannot be made to hold."""

    def test_a_uuid_libvirt_would_never_write_is_refused(self) -> None:
        """A document whose <uuid> is no UUID cannot become a server id."""
        with pytest.raises(errors.AdoptionRefused, match="is not a valid UUID"):
            adopt.inspect(_domain_xml(("vda", "/x/disk"), uuid_text="not-a-uuid"))

    def test_a_nova_guest_booted_from_a_volume_is_refused_even_on_a_file(self) -> None:
        """An NFS-backed Cinder root volume is a file, but it is not rebuildd's to replace."""
        domain = _domain_xml(("vda", "/var/lib/nova/mnt/abc/volume-1"), nova=True)
        root = domain.find(f"metadata/{{{NOVA_NS}}}instance/{{{NOVA_NS}}}root")
        root.set("type", "volume")
        with pytest.raises(errors.AdoptionRefused, match="booted it from a volume"):
            adopt.inspect(domain)

    def test_nova_ephemeral_disk_is_found_only_in_the_instance_directory(self) -> None:
        """With an ephemeral disk in Nova's flavor and no file named like one, the next file
        disk of the instance directory is it; a disk from elsewhere stays someone's data."""
        home = "/var/lib/nova/instances/x"
        found = adopt.inspect(
            _domain_xml(("vda", f"{home}/disk"), ("vdb", f"{home}/eph"), nova=True)
        )
        assert [d.role for d in found.disks] == ["root", "ephemeral"]
        found = adopt.inspect(
            _domain_xml(("vda", f"{home}/disk"), ("vdb", "/srv/data.qcow2"), nova=True)
        )
        assert [d.role for d in found.disks] == ["root", "other"]
        assert found.memory_mib == 1024

    def test_an_exactly_matching_enabled_flavor_is_reused(self) -> None:
        """Same five values: reused (Nova's name first); a disabled one is not; a new flavor
        falls back to the adopted- name when Nova's name is taken by other values."""
        values = adopt.FlavorValues(vcpus=1, ram=128, disk=1, ephemeral=1, swap=16)
        same = Flavor(id="a", name="any", vcpus=1, ram=128, disk=1, ephemeral=1, swap=16)
        named = dataclasses.replace(same, id="b", name="m1.web")
        off = dataclasses.replace(same, id="c", name="off", disabled=True)
        assert adopt.choose_flavor(values, [same, named], "m1.web") == (named, False)
        assert adopt.choose_flavor(values, [same, off], "m1.web") == (same, False)
        taken = dataclasses.replace(same, id="d", name="m1.web", ram=4096)
        flavor, created = adopt.choose_flavor(values, [off, taken], "m1.web")
        assert created and flavor.id == flavor.name == "adopted-1c-128m-1g-1e-16s"
