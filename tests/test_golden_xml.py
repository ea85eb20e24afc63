"""Golden domain XML, virt-manager style: real ``virsh dumpxml --inactive`` documents
(``tests/data/golden/<name>-in.xml``, captured by ``tests/data/golden/capture.sh`` from the
definitions in ``sources/``) as ``rebuildd adopt`` reads them, and as rebuildd's disk edits
leave them (``<name>-out.xml``). Every output is also defined on libvirt's test driver.

Regenerate the outputs with ``TEST_REBUILDD_GOLDEN_UPDATE=1 pytest tests/test_golden_xml.py`` and
review the diff.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from lxml import etree

from rebuildd import adopt, domxml, guestdisks, novameta
from rebuildd.adopt import Defaults, FlavorValues, Inspection
from rebuildd.models import BlockDevice, Server
from rebuildd.pipeline import domain_metadata
from rebuildd.states import PowerState

libvirt = pytest.importorskip("libvirt")

GOLDEN = Path(__file__).parent / "data" / "golden"
UPDATE = os.environ.get("TEST_REBUILDD_GOLDEN_UPDATE") == "1"
NEW_IMAGE = "c0ffee00-aaaa-4bbb-8ccc-ddddeeeeffff"
NOW = dt.datetime(2026, 12, 1, 12, 0, 0, tzinfo=dt.UTC)
DEFAULTS = Defaults(host="golden-host", project_id="demo", user_id="demo")
GiB = 1024**3
MiB = 1024**2
# Virtual sizes qemu-img would report for the disk files of each document.
SIZES = {
    "rebuildd": {
        "/var/lib/rebuildd/instances/2b7e51c4-0d3a-4f1e-9c6b-8a5d4e3f2a10/root-5f1d2c3b4a69.qcow2": GiB
    },
    "nova": {
        "/var/lib/nova/instances/6a1c2f3e-4b5d-4e6f-8a9b-0c1d2e3f4a5b/disk": GiB,
        "/var/lib/nova/instances/6a1c2f3e-4b5d-4e6f-8a9b-0c1d2e3f4a5b/disk.eph0": GiB,
        "/var/lib/nova/instances/6a1c2f3e-4b5d-4e6f-8a9b-0c1d2e3f4a5b/disk.swap": 64 * MiB,
    },
    "plain": {"/srv/guests/plain/root.img": 3 * GiB + 1},
}
CASES = sorted(SIZES)


@dataclasses.dataclass(frozen=True)
class Read:
    """One golden input as adopt reads it."""

    found: Inspection
    values: FlavorValues
    server: Server
    devices: tuple[BlockDevice, ...]


def _input(name: str) -> etree._Element:
    return domxml.parse((GOLDEN / f"{name}-in.xml").read_bytes())


def _read(name: str) -> Read:
    found = adopt.inspect(_input(name))
    values = adopt.flavor_values(found, SIZES[name])
    nova_name = found.nova.flavor.name if found.nova and found.nova.flavor else None
    flavor, created = adopt.choose_flavor(values, [], nova_name)
    assert created
    server, devices = adopt.build(
        found,
        flavor=flavor,
        sizes=SIZES[name],
        power_state=PowerState.SHUTDOWN,
        defaults=DEFAULTS,
        now=NOW,
    )
    return Read(found, values, server, devices)


def _new_path(server: Server, device: BlockDevice) -> str:
    if device.guest_format == "iso9660":
        return f"/var/lib/rebuildd/instances/{server.id}/disk.config"
    return f"/var/lib/rebuildd/instances/{server.id}/{device.device_name}-golden.qcow2"


def rebuilt(name: str) -> etree._Element:
    """The input after a rebuild onto NEW_IMAGE, edited as the rebuild pipeline edits it
    (guestdisks picks the disks, the hypervisor detaches them all, then attaches each old
    element renewed on its new file, with rebuildd's and Nova's metadata in the same define)."""
    read = _read(name)
    root = _input(name)
    server = dataclasses.replace(read.server, image_ref=NEW_IMAGE)
    replaced = guestdisks.replaced_by_rebuild(read.devices, preserve_ephemeral=False)
    assert {d.device_name for d in replaced} == {d.device_name for d in read.devices if d.owned}
    old = {}
    for device in replaced:
        removed = domxml.remove_disk(root, device.device_name)
        assert removed is not None
        old[device.device_name] = domxml.to_string(removed)
    for device in replaced:
        new = guestdisks.new_disk(device, _new_path(server, device), old[device.device_name])
        domxml.add_disk(root, new if isinstance(new, domxml.DiskSpec) else domxml.parse(new))
    domxml.write_metadata(root, domain_metadata(server, NEW_IMAGE))
    return root


def _canonical(root: etree._Element) -> str:
    return str(etree.canonicalize(domxml.to_string(root), strip_text=True))


def _pretty(root: etree._Element) -> bytes:
    parser = etree.XMLParser(remove_blank_text=True)
    tree = etree.fromstring(domxml.to_string(root).encode(), parser)
    return bytes(etree.tostring(tree, pretty_print=True))


def _outside(root: etree._Element, owned: set[str]) -> str:
    """The document without its owned disks and without rebuildd's and Nova's metadata."""
    copy = domxml.parse(domxml.to_string(root))
    for target in owned:
        domxml.remove_disk(copy, target)
    metadata = copy.find("metadata")
    if metadata is not None:
        for ns in (domxml.REBUILDD_NS, *novameta.READ_NAMESPACES):
            for el in metadata.findall(f"{{{ns}}}instance"):
                metadata.remove(el)
    return _canonical(copy)


@pytest.fixture(scope="module")
def conn() -> Iterator[object]:
    connection = libvirt.open("test:///default")
    yield connection
    connection.close()


def _by_target(devices: tuple[BlockDevice, ...]) -> dict[str, BlockDevice]:
    return {d.device_name: d for d in devices}


class TestAdoptReading:
    def test_rebuildd_made_domain(self) -> None:
        """One virtio root disk; no Nova metadata: the domain's name, the host's defaults."""
        read = _read("rebuildd")
        assert read.values == FlavorValues(vcpus=1, ram=128, disk=1, ephemeral=0, swap=0)
        (root,) = read.devices
        assert (root.device_name, root.boot_index, root.source_type, root.destination_type) == (
            "vda",
            0,
            "image",
            "local",
        )
        assert (root.disk_bus, root.device_type, root.owned, root.image_id) == (
            "virtio",
            "disk",
            True,
            None,
        )
        server = read.server
        assert server.id == "2b7e51c4-0d3a-4f1e-9c6b-8a5d4e3f2a10"
        assert server.name == server.domain_name == "rebuildd-adopt-test-golden-rebuildd"
        assert (server.project_id, server.user_id, server.image_ref) == ("demo", "demo", "")
        assert (server.created_at, server.launched_at, server.config_drive) == (NOW, NOW, False)
        assert server.flavor.name == "adopted-1c-128m-1g"

    def test_nova_made_domain(self) -> None:
        """Nova's metadata names the server, its owner, image and flavor; the ephemeral and
        swap disks, the config drive and the volume are recognised by Nova's file names."""
        read = _read("nova")
        assert read.values == FlavorValues(vcpus=1, ram=512, disk=1, ephemeral=1, swap=64)
        server = read.server
        assert (server.name, server.hostname) == ("web-1", "web-1")
        assert server.project_id == "e1d2c3b4a5f64e7d8c9b0a1f2e3d4c5b"
        assert server.user_id == "5a4b3c2d1e0f4a9b8c7d6e5f4a3b2c1d"
        assert server.image_ref == "1d2c3b4a-5e6f-4a7b-8c9d-0e1f2a3b4c5d"
        assert server.created_at == dt.datetime(2024, 3, 5, 10, 11, 12, tzinfo=dt.UTC)
        assert server.config_drive
        assert server.flavor.name == "m1.web"
        by = _by_target(read.devices)
        assert sorted(by) == ["hdd", "vda", "vdb", "vdc", "vdd"]
        assert (by["vda"].boot_index, by["vda"].image_id) == (0, server.image_ref)
        assert (by["vdb"].source_type, by["vdb"].guest_format, by["vdb"].size_mib) == (
            "blank",
            "ext4",
            1024,
        )
        assert (by["vdc"].guest_format, by["vdc"].size_mib, by["vdc"].boot_index) == (
            "swap",
            64,
            None,
        )
        assert (by["hdd"].device_type, by["hdd"].guest_format, by["hdd"].disk_bus) == (
            "cdrom",
            "iso9660",
            "ide",
        )
        volume = by["vdd"]
        assert (volume.owned, volume.source_type, volume.destination_type) == (
            False,
            "volume",
            "volume",
        )
        assert volume.volume_id == "0b1c2d3e-4f5a-4b6c-8d7e-9f0a1b2c3d4e"
        assert all(d.owned for t, d in by.items() if t != "vdd")

    def test_hand_made_domain(self) -> None:
        """The root is the disk with boot order 1 (on SATA, raw), rounded up to whole GiB;
        the empty CD-ROM, the data disk and the RBD volume are recorded but not owned."""
        read = _read("plain")
        assert read.values == FlavorValues(vcpus=2, ram=256, disk=4, ephemeral=0, swap=0)
        by = _by_target(read.devices)
        assert sorted(by) == ["sda", "sdb", "vdb", "vdc"]
        assert (by["sdb"].boot_index, by["sdb"].disk_bus, by["sdb"].path) == (
            0,
            "sata",
            "/srv/guests/plain/root.img",
        )
        assert [t for t, d in by.items() if not d.owned] == ["sda", "vdb", "vdc"]
        assert (by["sda"].device_type, by["sda"].path) == ("cdrom", None)
        assert (by["vdb"].source_type, by["vdb"].destination_type) == ("blank", "local")
        assert by["vdc"].volume_id == "3e2d1c0b-9a8f-4e7d-8c6b-5a4f3e2d1c0b"
        assert not read.server.config_drive


@pytest.mark.parametrize("name", CASES)
class TestRebuildTransform:
    def test_output_matches_the_golden_file(self, name: str) -> None:
        """The transform's output equals <name>-out.xml (canonical XML, text stripped)."""
        out = GOLDEN / f"{name}-out.xml"
        result = rebuilt(name)
        if UPDATE:
            out.write_bytes(_pretty(result))
        assert _canonical(result) == _canonical(domxml.parse(out.read_bytes()))

    def test_output_is_valid_libvirt_xml(self, name: str, conn: object) -> None:
        """Every -out document defines on libvirt's test driver, with every disk it names."""
        out = domxml.parse((GOLDEN / f"{name}-out.xml").read_bytes())
        dom = conn.defineXML(domxml.to_string(out))  # type: ignore[attr-defined]
        try:
            back = domxml.parse(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        finally:
            dom.undefine()
        assert sorted(domxml.disk_targets(back)) == sorted(domxml.disk_targets(out))
        assert domxml.get_metadata(back)["image"] == NEW_IMAGE

    def test_only_owned_disks_and_metadata_change(self, name: str) -> None:
        """Outside the owned disks and rebuildd's and Nova's metadata, in and out are equal;
        every owned disk now points at its new file."""
        read = _read(name)
        owned = {d.device_name for d in read.devices if d.owned}
        out = domxml.parse((GOLDEN / f"{name}-out.xml").read_bytes())
        assert _outside(out, owned) == _outside(_input(name), owned)
        server = dataclasses.replace(read.server, image_ref=NEW_IMAGE)
        for device in read.devices:
            disk = domxml.find_disk(out, device.device_name)
            assert disk is not None
            expected = _new_path(server, device) if device.owned else device.path
            assert domxml.disk_source(disk) == expected

    def test_nova_metadata_follows_the_rebuild(self, name: str) -> None:
        """Every rebuilt domain carries Nova's metadata naming the new image; where Nova's was
        there before, its ports and owner names are kept."""
        before = novameta.read(_input(name))
        after = novameta.read(domxml.parse((GOLDEN / f"{name}-out.xml").read_bytes()))
        assert after is not None and after.root_uuid == NEW_IMAGE
        if before is None:
            return
        assert (after.root_uuid, after.name, after.ports) == (NEW_IMAGE, before.name, before.ports)
        assert (after.user_name, after.project_name) == (before.user_name, before.project_name)
