"""Domain XML editing keeps everything rebuildd does not own; outputs define on libvirt's test driver."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from lxml import etree

from rebuildd import domxml

libvirt = pytest.importorskip("libvirt")

FOREIGN = """<domain type='qemu'>
  <name>golden</name>
  <uuid>3f7c0cbe-8e1a-4a9e-9d0a-0e0d5b8d2c11</uuid>
  <metadata>
    <other:thing xmlns:other="https://example.org/other">value</other:thing>
  </metadata>
  <memory unit='KiB'>131072</memory>
  <vcpu placement='static'>1</vcpu>
  <os><type arch='x86_64'>hvm</type><boot dev='hd'/></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/old/root.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/var/lib/data.raw'/>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <interface type='user'><mac address='52:54:00:12:34:56'/><model type='virtio'/></interface>
    <serial type='pty'><target port='0'/></serial>
    <graphics type='vnc' port='-1'/>
  </devices>
</domain>"""


@pytest.fixture
def conn() -> Iterator[object]:
    connection = libvirt.open("test:///default")
    yield connection
    connection.close()


def _define_and_read(conn: object, root: etree._Element) -> etree._Element:
    dom = conn.defineXML(domxml.to_string(root))  # type: ignore[attr-defined]
    try:
        return domxml.parse(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    finally:
        dom.undefine()


def _without(root: etree._Element, *targets: str) -> str:
    copy = domxml.parse(domxml.to_string(root))
    for target in targets:
        domxml.remove_disk(copy, target)
    return domxml.outside_disks(copy)


class TestDiskEdits:
    def test_replacing_the_root_disk_changes_only_that_disk(self) -> None:
        """Detach vda, attach a new vda: the data disk, NIC, serial, graphics, metadata stay."""
        root = domxml.parse(FOREIGN)
        removed = domxml.remove_disk(root, "vda")
        assert removed is not None and domxml.disk_source(removed) == "/var/lib/old/root.qcow2"
        domxml.add_disk(root, domxml.DiskSpec(target="vda", path="/var/lib/new/root.qcow2"))
        assert domxml.disk_targets(root) == ["vda", "vdc"]
        assert domxml.outside_disks(root) == domxml.outside_disks(domxml.parse(FOREIGN))
        data = domxml.find_disk(root, "vdc")
        assert data is not None and domxml.disk_source(data) == "/var/lib/data.raw"

    def test_putting_the_old_disk_back_restores_the_document(self) -> None:
        """remove then add of the returned element gives back the original disk exactly."""
        root = domxml.parse(FOREIGN)
        removed = domxml.remove_disk(root, "vda")
        assert removed is not None
        domxml.add_disk(root, domxml.DiskSpec(target="vda", path="/tmp/new.qcow2"))
        domxml.add_disk(root, domxml.parse(domxml.to_string(removed)))
        original = domxml.find_disk(domxml.parse(FOREIGN), "vda")
        restored = domxml.find_disk(root, "vda")
        assert original is not None and restored is not None
        assert etree.tostring(restored, method="c14n") == etree.tostring(original, method="c14n")

    def test_removing_a_missing_disk_is_a_no_op(self) -> None:
        """A repeated detach finds nothing and changes nothing."""
        root = domxml.parse(FOREIGN)
        before = domxml.to_string(root)
        assert domxml.remove_disk(root, "vdz") is None
        assert domxml.to_string(root) == before

    def test_adding_the_same_target_twice_keeps_one_disk(self) -> None:
        """add_disk is idempotent per target."""
        root = domxml.parse(FOREIGN)
        spec = domxml.DiskSpec(target="vdb", path="/tmp/b.qcow2")
        domxml.add_disk(root, spec)
        domxml.add_disk(root, spec)
        assert domxml.disk_targets(root) == ["vda", "vdb", "vdc"]

    def test_edited_xml_defines_on_the_test_driver(self, conn: object) -> None:
        """The edited document is valid libvirt XML, and libvirt keeps the foreign metadata."""
        root = domxml.parse(FOREIGN)
        domxml.remove_disk(root, "vda")
        domxml.add_disk(root, domxml.DiskSpec(target="vda", path="/tmp/new.qcow2"))
        domxml.set_metadata(root, (("server", "abc"),))
        read = _define_and_read(conn, root)
        assert domxml.get_metadata(read) == {"server": "abc"}
        other = read.find("metadata/{https://example.org/other}thing")
        assert other is not None and other.text == "value"
        vda = domxml.find_disk(read, "vda")
        assert vda is not None and domxml.disk_source(vda) == "/tmp/new.qcow2"


class TestBuild:
    @pytest.mark.parametrize("interface", ["none", "user", "network"])
    def test_new_domain_defines_on_the_test_driver(self, conn: object, interface: str) -> None:
        """build_domain's output is accepted by libvirt, with the disk, NIC and console asked for."""
        spec = domxml.DomainSpec(
            name=f"rebuildd-unit-{uuid.uuid4()}",
            uuid=str(uuid.uuid4()),
            domain_type="test",
            memory_mib=128,
            vcpus=1,
            disks=(domxml.DiskSpec(target="vda", path="/tmp/root.qcow2"),),
            interface=interface,  # type: ignore[arg-type]
            metadata=domxml.Metadata(items=(("server", "s1"), ("name", "a <b> & 'c'"))),
        )
        read = _define_and_read(conn, domxml.build_domain(spec))
        assert domxml.disk_targets(read) == ["vda"]
        assert (read.find("devices/interface") is not None) == (interface != "none")
        assert read.find("devices/serial") is not None
        assert domxml.get_metadata(read)["name"] == "a <b> & 'c'"

    def test_metadata_rewrite_keeps_other_namespaces(self) -> None:
        """set_metadata replaces only rebuildd's element."""
        root = domxml.parse(FOREIGN)
        domxml.set_metadata(root, (("image", "one"),))
        domxml.set_metadata(root, (("image", "two"),))
        assert domxml.get_metadata(root) == {"image": "two"}
        assert root.find("metadata/{https://example.org/other}thing") is not None
        assert _without(root) == _without(domxml.parse(FOREIGN))
