"""Nova's ``<nova:instance>`` domain metadata: read it, write it, and derive it from a server.

Owns the XML shape Nova's libvirt driver writes into ``<metadata>``
(``nova/virt/libvirt/config.py``, ``LibvirtConfigGuestMetaNova*``), namespace
``http://openstack.org/xmlns/libvirt/nova/1.1``. 1.1 (Nova 23, Wallaby) added ``<nova:ports>``
to 1.0; Nova 2025.1 added the flavor's ``id`` and ``<nova:extraSpecs>`` and ``<nova:image>``
without a new namespace. Reading accepts 1.0 and 1.1 and tolerates every missing element;
writing produces 1.1 and replaces only the ``nova:instance`` child of ``<metadata>``, so
rebuildd's own metadata and any other tool's stay as they are.

Pure functions over lxml elements: no libvirt calls, no I/O, no XML built from strings.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Final

from lxml import etree

import rebuildd
from rebuildd.models import Server

NOVA_NS: Final = "http://openstack.org/xmlns/libvirt/nova/1.1"
NOVA_NS_1_0: Final = "http://openstack.org/xmlns/libvirt/nova/1.0"
READ_NAMESPACES: Final = (NOVA_NS, NOVA_NS_1_0)
TIME_FORMAT: Final = "%Y-%m-%d %H:%M:%S"  # UTC: Nova formats time.gmtime(creationTime)
Element = etree._Element


@dataclass(frozen=True, slots=True)
class NovaFlavor:
    """``<nova:flavor>``: sizes as Nova writes them (memory and swap MiB, disks GiB)."""

    name: str | None
    memory: int | None
    disk: int | None
    swap: int | None
    ephemeral: int | None
    vcpus: int | None
    id: str | None = None  # Nova 2025.1+
    extra_specs: tuple[tuple[str, str], ...] = ()  # Nova 2025.1+


@dataclass(frozen=True, slots=True)
class NovaIp:
    type: str  # fixed | floating
    address: str
    version: str  # "4" | "6"


@dataclass(frozen=True, slots=True)
class NovaPort:
    """``<nova:port>`` (namespace 1.1): a Neutron port and its addresses."""

    uuid: str
    ips: tuple[NovaIp, ...] = ()


@dataclass(frozen=True, slots=True)
class NovaImage:
    """``<nova:image>`` (Nova 2025.1+): the image the instance was booted or rebuilt from."""

    uuid: str  # "" for an instance booted from a volume
    container_format: str | None = None
    disk_format: str | None = None
    min_disk: int | None = None
    min_ram: int | None = None
    properties: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class NovaInstance:
    """One ``<nova:instance>`` document; every part Nova may leave out is optional."""

    name: str | None = None
    creation_time: dt.datetime | None = None  # aware UTC, whole seconds
    flavor: NovaFlavor | None = None
    user_uuid: str | None = None
    user_name: str | None = None
    project_uuid: str | None = None
    project_name: str | None = None
    root_type: str | None = None  # image | volume
    root_uuid: str | None = None
    package: str | None = None  # Nova's version string, e.g. "27.1.0"
    image: NovaImage | None = None
    ports: tuple[NovaPort, ...] | None = None  # None: no <nova:ports> (namespace 1.0)


# -- reading ---------------------------------------------------------------------------------


def find(root: Element) -> Element | None:
    """The ``nova:instance`` element of a ``<domain>`` (namespace 1.1 or 1.0), or None."""
    metadata = root.find("metadata")
    if metadata is None:
        return None
    for ns in READ_NAMESPACES:
        found = metadata.find(f"{{{ns}}}instance")
        if found is not None:
            return found
    return None


def read(root: Element) -> NovaInstance | None:
    """Nova's metadata of a ``<domain>``, or None when it has none."""
    instance = find(root)
    if instance is None:
        return None
    ns = etree.QName(instance).namespace or NOVA_NS
    nova = _Reader(ns)
    owner = nova.child(instance, "owner")
    user = nova.child(owner, "user")
    project = nova.child(owner, "project")
    root_el = nova.child(instance, "root")
    ports = nova.child(instance, "ports")
    return NovaInstance(
        name=nova.text(instance, "name"),
        creation_time=_parse_time(nova.text(instance, "creationTime")),
        flavor=nova.flavor(nova.child(instance, "flavor")),
        user_uuid=_attr(user, "uuid"),
        user_name=_text(user),
        project_uuid=_attr(project, "uuid"),
        project_name=_text(project),
        root_type=_attr(root_el, "type"),
        root_uuid=_attr(root_el, "uuid"),
        package=_attr(nova.child(instance, "package"), "version"),
        image=nova.image(nova.child(instance, "image")),
        ports=None if ports is None else nova.ports(ports),
    )


@dataclass(frozen=True, slots=True)
class _Reader:
    ns: str

    def q(self, tag: str) -> str:
        return f"{{{self.ns}}}{tag}"

    def child(self, parent: Element | None, tag: str) -> Element | None:
        return None if parent is None else parent.find(self.q(tag))

    def text(self, parent: Element | None, tag: str) -> str | None:
        return _text(self.child(parent, tag))

    def number(self, parent: Element | None, tag: str) -> int | None:
        return _int(self.text(parent, tag))

    def named(self, parent: Element | None, tag: str) -> tuple[tuple[str, str], ...]:
        if parent is None:
            return ()
        return tuple((el.get("name", ""), el.text or "") for el in parent.iterfind(self.q(tag)))

    def flavor(self, el: Element | None) -> NovaFlavor | None:
        if el is None:
            return None
        return NovaFlavor(
            name=el.get("name"),
            memory=self.number(el, "memory"),
            disk=self.number(el, "disk"),
            swap=self.number(el, "swap"),
            ephemeral=self.number(el, "ephemeral"),
            vcpus=self.number(el, "vcpus"),
            id=el.get("id"),
            extra_specs=self.named(self.child(el, "extraSpecs"), "extraSpec"),
        )

    def image(self, el: Element | None) -> NovaImage | None:
        if el is None:
            return None
        return NovaImage(
            uuid=el.get("uuid", ""),
            container_format=self.text(el, "containerFormat"),
            disk_format=self.text(el, "diskFormat"),
            min_disk=self.number(el, "minDisk"),
            min_ram=self.number(el, "minRam"),
            properties=self.named(self.child(el, "properties"), "property"),
        )

    def ports(self, el: Element) -> tuple[NovaPort, ...]:
        return tuple(
            NovaPort(
                uuid=port.get("uuid", ""),
                ips=tuple(
                    NovaIp(
                        type=ip.get("type", ""),
                        address=ip.get("address", ""),
                        version=ip.get("ipVersion", ""),
                    )
                    for ip in port.iterfind(self.q("ip"))
                ),
            )
            for port in el.iterfind(self.q("port"))
        )


def _text(el: Element | None) -> str | None:
    if el is None or el.text is None:
        return None
    return el.text.strip() or None


def _attr(el: Element | None, name: str) -> str | None:
    return None if el is None else el.get(name)


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _parse_time(text: str | None) -> dt.datetime | None:
    if text is None:
        return None
    try:
        return dt.datetime.strptime(text, TIME_FORMAT).replace(tzinfo=dt.UTC)
    except ValueError:
        return None


# -- writing ---------------------------------------------------------------------------------


def write(root: Element, meta: NovaInstance) -> None:
    """Put ``meta`` into the ``<domain>``'s ``<metadata>``, in place of any ``nova:instance``
    (1.0 or 1.1) and at its position; every other child of ``<metadata>`` is left alone."""
    metadata = _metadata(root)
    new = element(meta)
    old = [el for ns in READ_NAMESPACES for el in metadata.findall(f"{{{ns}}}instance")]
    if old:
        new.tail = old[0].tail
        old[0].addprevious(new)
        for el in old:
            metadata.remove(el)
    else:
        metadata.append(new)


def element(meta: NovaInstance) -> Element:
    """The ``<nova:instance>`` element for ``meta``, children in the order Nova writes them."""
    w = _Writer()
    instance = w.new("instance")
    pkg = w.sub(instance, "package")
    if meta.package is not None:
        pkg.set("version", meta.package)
    if meta.name is not None:
        w.sub(instance, "name", meta.name)
    if meta.creation_time is not None:
        w.sub(instance, "creationTime", _format_time(meta.creation_time))
    if meta.flavor is not None:
        w.flavor(instance, meta.flavor)
    if meta.image is not None:
        w.image(instance, meta.image)
    w.owner(instance, meta)
    if meta.root_type is not None and meta.root_uuid is not None:
        w.sub(instance, "root", type=meta.root_type, uuid=meta.root_uuid)
    if meta.ports is not None:
        ports = w.sub(instance, "ports")
        for port in meta.ports:
            port_el = w.sub(ports, "port", uuid=port.uuid)
            for ip in port.ips:
                w.sub(port_el, "ip", type=ip.type, address=ip.address, ipVersion=ip.version)
    return instance


class _Writer:
    """Builds elements in Nova's namespace with Nova's ``nova`` prefix."""

    @staticmethod
    def q(tag: str) -> str:
        return f"{{{NOVA_NS}}}{tag}"

    def new(self, tag: str) -> Element:
        return etree.Element(self.q(tag), nsmap={"nova": NOVA_NS})

    def sub(self, parent: Element, tag: str, text: str | None = None, **attrs: str) -> Element:
        child = etree.SubElement(parent, self.q(tag), attrs)
        if text is not None:
            child.text = text
        return child

    def flavor(self, parent: Element, flavor: NovaFlavor) -> None:
        el = self.sub(parent, "flavor")
        if flavor.name is not None:
            el.set("name", flavor.name)
        if flavor.id is not None:
            el.set("id", flavor.id)
        for tag, value in (
            ("memory", flavor.memory),
            ("disk", flavor.disk),
            ("swap", flavor.swap),
            ("ephemeral", flavor.ephemeral),
            ("vcpus", flavor.vcpus),
        ):
            if value is not None:
                self.sub(el, tag, str(value))
        specs = self.sub(el, "extraSpecs")
        for name, spec in flavor.extra_specs:
            self.sub(specs, "extraSpec", spec, name=name)

    def image(self, parent: Element, image: NovaImage) -> None:
        el = self.sub(parent, "image", uuid=image.uuid)
        for tag, value in (
            ("containerFormat", image.container_format),
            ("diskFormat", image.disk_format),
            ("minDisk", image.min_disk),
            ("minRam", image.min_ram),
        ):
            if value is not None:
                self.sub(el, tag, str(value))
        props = self.sub(el, "properties")
        for name, prop in image.properties:
            self.sub(props, "property", prop, name=name)

    def owner(self, parent: Element, meta: NovaInstance) -> None:
        has_user = meta.user_uuid is not None and meta.user_name is not None
        has_project = meta.project_uuid is not None and meta.project_name is not None
        if not (has_user or has_project):
            return
        owner = self.sub(parent, "owner")
        if has_user:
            self.sub(owner, "user", meta.user_name, uuid=meta.user_uuid or "")
        if has_project:
            self.sub(owner, "project", meta.project_name, uuid=meta.project_uuid or "")


def _metadata(root: Element) -> Element:
    """The ``<metadata>`` of a ``<domain>``, made right after ``<uuid>`` when missing."""
    metadata = root.find("metadata")
    if metadata is not None:
        return metadata
    metadata = etree.Element("metadata")
    anchor = root.find("uuid")
    if anchor is None:
        anchor = root.find("name")
    if anchor is not None:
        anchor.addnext(metadata)
    else:
        root.insert(0, metadata)
    return metadata


def _format_time(when: dt.datetime) -> str:
    if when.tzinfo is not None:
        when = when.astimezone(dt.UTC)
    return when.strftime(TIME_FORMAT)


# -- from a rebuildd server ------------------------------------------------------------------


def for_server(
    server: Server, image_id: str, *, previous: NovaInstance | None = None
) -> NovaInstance:
    """Nova's metadata for ``server`` booted (or rebuilt) from ``image_id``.

    rebuildd knows ids, not user or project names, nor Neutron ports: from ``previous`` (what
    Nova wrote, say) it keeps the ports and the names whose uuid is unchanged; otherwise the
    names are the ids.
    """
    flavor = server.flavor
    user_name = project_name = None
    ports = None
    if previous is not None:
        ports = previous.ports
        if previous.user_uuid == server.user_id:
            user_name = previous.user_name
        if previous.project_uuid == server.project_id:
            project_name = previous.project_name
    return NovaInstance(
        name=server.name,
        creation_time=server.created_at.replace(microsecond=0),
        flavor=NovaFlavor(
            name=flavor.name,
            id=flavor.id,
            memory=flavor.ram,
            disk=flavor.disk,
            swap=flavor.swap,
            ephemeral=flavor.ephemeral,
            vcpus=flavor.vcpus,
            extra_specs=tuple(sorted(flavor.extra_specs.items())),
        ),
        user_uuid=server.user_id,
        user_name=user_name or server.user_id,
        project_uuid=server.project_id,
        project_name=project_name or server.project_id,
        root_type="image",
        root_uuid=image_id,
        package=f"rebuildd {rebuildd.__version__}",
        image=NovaImage(uuid=image_id, properties=tuple(sorted(server.image_properties.items()))),
        ports=ports,
    )
