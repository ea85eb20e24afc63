"""Nova's <nova:instance> metadata: read tolerantly, written as Nova writes it, next to others'."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from lxml import etree

from rebuildd import domxml, novameta
from rebuildd.models import Flavor, Server
from rebuildd.novameta import NovaFlavor, NovaImage, NovaInstance, NovaIp, NovaPort

libvirt = pytest.importorskip("libvirt")

DATA = Path(__file__).parent / "data" / "nova_metadata"
FOREIGN_NS = "https://example.org/other"
UUID = "3f7c0cbe-8e1a-4a9e-9d0a-0e0d5b8d2c11"


def _domain(metadata: etree._Element | None = None) -> etree._Element:
    root = etree.Element("domain", type="qemu")
    etree.SubElement(root, "name").text = "rebuildd-adopt-test-meta"
    etree.SubElement(root, "uuid").text = UUID
    if metadata is not None:
        root.append(metadata)
    etree.SubElement(root, "memory", unit="KiB").text = "131072"
    etree.SubElement(root, "vcpu").text = "1"
    os_el = etree.SubElement(root, "os")
    etree.SubElement(os_el, "type", arch="x86_64").text = "hvm"
    return root


def _document(name: str) -> etree._Element:
    return _domain(etree.parse(str(DATA / name)).getroot())


def _canonical(el: etree._Element) -> str:
    return str(etree.canonicalize(etree.tostring(el, encoding="unicode"), strip_text=True))


def _server(**changes: object) -> Server:
    now = dt.datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=dt.UTC)
    server = Server(
        id=UUID,
        name="vm-1",
        project_id="p-1",
        user_id="u-1",
        image_ref="img-old",
        flavor=Flavor(
            id="7",
            name="m1.x",
            vcpus=2,
            ram=1024,
            disk=10,
            ephemeral=1,
            swap=256,
            extra_specs={"b": "2", "a": "1"},
        ),
        vm_state="active",
        task_state=None,
        power_state=1,
        host="h",
        node="h",
        domain_name="rebuildd-adopt-test-meta",
        hostname="vm-1",
        metadata={},
        key_name=None,
        key_data=None,
        user_data=None,
        description=None,
        access_ip_v4="",
        access_ip_v6="",
        auto_disk_config=False,
        locked=False,
        locked_reason=None,
        config_drive=False,
        progress=0,
        launched_at=now,
        terminated_at=None,
        created_at=now,
        updated_at=now,
        image_properties={"os_distro": "debian"},
    )
    return dataclasses.replace(server, **changes)  # type: ignore[arg-type]


@pytest.fixture
def conn() -> Iterator[object]:
    connection = libvirt.open("test:///default")
    yield connection
    connection.close()


class TestRead:
    def test_a_namespace_1_1_document_is_read_whole(self) -> None:
        """Every part Nova writes in 1.1 (and 2025.1's additions) comes back typed."""
        meta = novameta.read(_document("nova-1.1.xml"))
        assert meta == NovaInstance(
            name="web-1",
            creation_time=dt.datetime(2025, 6, 7, 8, 9, 10, tzinfo=dt.UTC),
            flavor=NovaFlavor(
                name="m1.small",
                memory=2048,
                disk=20,
                swap=512,
                ephemeral=1,
                vcpus=1,
                id="2",
                extra_specs=(("hw_rng:allowed", "True"),),
            ),
            user_uuid="5a4b3c2d1e0f4a9b8c7d6e5f4a3b2c1d",
            user_name="alice",
            project_uuid="e1d2c3b4a5f64e7d8c9b0a1f2e3d4c5b",
            project_name="web",
            root_type="image",
            root_uuid="1d2c3b4a-5e6f-4a7b-8c9d-0e1f2a3b4c5d",
            package="31.0.0",
            image=NovaImage(
                uuid="1d2c3b4a-5e6f-4a7b-8c9d-0e1f2a3b4c5d",
                container_format="bare",
                disk_format="qcow2",
                min_disk=1,
                min_ram=0,
                properties=(("os_distro", "debian"), ("hw_disk_bus", "virtio")),
            ),
            ports=(
                NovaPort(
                    uuid="7e6d5c4b-3a2f-4e1d-9c8b-7a6f5e4d3c2b",
                    ips=(
                        NovaIp("fixed", "10.0.0.5", "4"),
                        NovaIp("fixed", "fd00::5", "6"),
                        NovaIp("floating", "203.0.113.7", "4"),
                    ),
                ),
            ),
        )

    def test_a_namespace_1_0_document_is_read_without_ports(self) -> None:
        """Nova before Wallaby wrote namespace 1.0: read the same way, ports absent (None)."""
        meta = novameta.read(_document("nova-1.0.xml"))
        assert meta is not None
        assert meta.name == "legacy-db"
        assert meta.flavor == NovaFlavor("m1.medium", 4096, 40, 0, 0, 2)
        assert (meta.project_uuid, meta.project_name) == (
            "9f8e7d6c5b4a49382716a5b4c3d2e1f0",
            "admin",
        )
        assert (meta.root_type, meta.root_uuid) == ("image", "6b0c1a3e-2f4d-4c5b-9a8e-7d6c5b4a3f21")
        assert meta.ports is None and meta.image is None

    def test_missing_and_malformed_parts_read_as_none(self) -> None:
        """An instance element with only a name and a bad number still reads, the rest None."""
        metadata = etree.Element("metadata")
        q = f"{{{novameta.NOVA_NS}}}"
        instance = etree.SubElement(metadata, f"{q}instance", nsmap={"nova": novameta.NOVA_NS})
        etree.SubElement(instance, f"{q}name").text = "bare"
        etree.SubElement(instance, f"{q}creationTime").text = "yesterday"
        flavor = etree.SubElement(instance, f"{q}flavor")
        etree.SubElement(flavor, f"{q}memory").text = "lots"
        assert novameta.read(_domain(metadata)) == NovaInstance(
            name="bare", flavor=NovaFlavor(None, None, None, None, None, None)
        )

    def test_a_domain_without_nova_metadata_reads_as_none(self) -> None:
        """No <metadata>, or one holding only others' elements: None."""
        assert novameta.read(_domain()) is None
        root = _domain()
        domxml.set_metadata(root, (("server", UUID),))
        assert novameta.read(root) is None


class TestWrite:
    def test_a_real_document_is_written_back_exactly(self) -> None:
        """read then write reproduces Nova's 1.1 document: same elements, order and values."""
        original = _document("nova-1.1.xml")
        meta = novameta.read(original)
        found = novameta.find(original)
        assert meta is not None and found is not None
        assert _canonical(novameta.element(meta)) == _canonical(found)

    def test_a_1_0_document_is_replaced_by_a_1_1_one_with_the_same_content(self) -> None:
        """Writing over Nova's 1.0 element leaves one element, in namespace 1.1, equal on read."""
        root = _document("nova-1.0.xml")
        meta = novameta.read(root)
        assert meta is not None
        novameta.write(root, meta)
        metadata = root.find("metadata")
        assert metadata is not None
        assert [el.tag for el in metadata] == [f"{{{novameta.NOVA_NS}}}instance"]
        assert novameta.read(root) == meta

    def test_round_trip(self) -> None:
        """write then read gives back what was written, including ports and the image."""
        meta = novameta.read(_document("nova-1.1.xml"))
        assert meta is not None
        root = _domain()
        novameta.write(root, meta)
        assert novameta.read(root) == meta

    def test_write_replaces_only_the_nova_element_and_keeps_others_in_place(self) -> None:
        """rebuildd's own and a third party's metadata survive untouched, in order."""
        root = _document("nova-1.0.xml")
        metadata = root.find("metadata")
        assert metadata is not None
        etree.SubElement(metadata, f"{{{FOREIGN_NS}}}note", nsmap={"o": FOREIGN_NS}).text = "x"
        domxml.set_metadata(root, (("server", UUID), ("name", "vm-1")))
        others = [etree.tostring(el) for el in metadata if novameta.find(root) is not el]

        novameta.write(root, NovaInstance(name="renamed"))

        assert [etree.QName(el).namespace for el in metadata] == [
            novameta.NOVA_NS,
            FOREIGN_NS,
            domxml.REBUILDD_NS,
        ]
        assert [etree.tostring(el) for el in metadata][1:] == others
        assert novameta.read(root) == NovaInstance(name="renamed")
        assert domxml.get_metadata(root) == {"server": UUID, "name": "vm-1"}

    def test_metadata_is_created_right_after_uuid(self) -> None:
        """A domain without <metadata> gets one right after <uuid>, where libvirt puts it."""
        root = _domain()
        novameta.write(root, NovaInstance(name="n"))
        assert [el.tag for el in root][:3] == ["name", "uuid", "metadata"]

    def test_libvirt_keeps_what_was_written(self, conn: object) -> None:
        """Defined on libvirt's test driver, the document reads back equal."""
        meta = novameta.read(_document("nova-1.1.xml"))
        assert meta is not None
        root = _domain()
        domxml.set_metadata(root, (("server", UUID),))
        novameta.write(root, meta)
        dom = conn.defineXML(domxml.to_string(root))  # type: ignore[attr-defined]
        try:
            back = domxml.parse(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        finally:
            dom.undefine()
        assert novameta.read(back) == meta
        assert domxml.get_metadata(back) == {"server": UUID}


class TestForServer:
    def test_server_fields_map_to_nova_fields(self) -> None:
        """Name, creation time (whole seconds, UTC), flavor, owner ids, root and image."""
        meta = novameta.for_server(_server(), "img-new")
        assert meta.name == "vm-1"
        assert meta.creation_time == dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
        assert meta.flavor == NovaFlavor(
            name="m1.x", memory=1024, disk=10, swap=256, ephemeral=1, vcpus=2, id="7",
            extra_specs=(("a", "1"), ("b", "2")),
        )  # fmt: skip
        assert (meta.user_uuid, meta.user_name) == ("u-1", "u-1")
        assert (meta.project_uuid, meta.project_name) == ("p-1", "p-1")
        assert (meta.root_type, meta.root_uuid) == ("image", "img-new")
        assert meta.image == NovaImage(uuid="img-new", properties=(("os_distro", "debian"),))
        assert meta.package is not None and meta.package.startswith("rebuildd ")
        assert meta.ports is None

    def test_previous_metadata_lends_ports_and_names_it_still_matches(self) -> None:
        """Ports and the names of an unchanged owner come from what Nova wrote."""
        previous = NovaInstance(
            user_uuid="u-1",
            user_name="alice",
            project_uuid="another",
            project_name="web",
            ports=(NovaPort("port-1"),),
        )
        meta = novameta.for_server(_server(), "img", previous=previous)
        assert (meta.user_name, meta.project_name) == ("alice", "p-1")
        assert meta.ports == (NovaPort("port-1"),)
