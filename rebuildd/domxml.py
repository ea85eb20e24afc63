"""Pure functions over libvirt domain XML (lxml): build a new domain, find, remove and add disks.

Owns the XML shapes rebuildd writes. Functions edit a parsed tree in place, so every element
rebuildd does not model (interfaces, graphics, serial, CPU, features, others' metadata) survives
byte for byte. No libvirt calls and no I/O here; no XML is ever built from strings.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Final, Literal

from lxml import etree

from rebuildd import novameta
from rebuildd.models import Server

REBUILDD_NS = "https://rebuildd.dev/xmlns/libvirt/domain/1.0"
Element = etree._Element


@dataclass(frozen=True, slots=True)
class Metadata:
    """What rebuildd writes into a domain's ``<metadata>``: its own element (key, value
    pairs) and, given the server, Nova's ``nova:instance`` (name, flavor, owner, root image),
    so the domain describes itself to rebuildd, to Nova's tools and to an operator."""

    items: tuple[tuple[str, str], ...]
    server: Server | None = None
    image_id: str | None = None


@dataclass(frozen=True, slots=True)
class DiskSpec:
    """A file-backed disk as rebuildd attaches it."""

    target: str  # e.g. "vda"
    path: str
    fmt: Literal["qcow2", "raw"] = "qcow2"
    bus: str = "virtio"
    device: Literal["disk", "cdrom"] = "disk"
    readonly: bool = False


@dataclass(frozen=True, slots=True)
class DomainSpec:
    """What a new domain needs; everything else is libvirt's default."""

    name: str
    uuid: str
    domain_type: str  # kvm | qemu | test
    memory_mib: int
    vcpus: int
    disks: tuple[DiskSpec | Element, ...]  # an Element: a volume's <disk> (volume_disk)
    interface: Literal["none", "user", "network"] = "user"
    network: str = "default"
    mac: str | None = None  # None: libvirt picks one
    metadata: Metadata = Metadata(items=())
    console_log: str | None = None  # a file the serial console is copied to (appended)


def parse(xml: str | bytes) -> Element:
    parser = etree.XMLParser(remove_blank_text=False, resolve_entities=False, no_network=True)
    data = xml.encode() if isinstance(xml, str) else xml
    return etree.fromstring(data, parser)


def to_string(root: Element) -> str:
    return etree.tostring(root, encoding="unicode")


def _sub(parent: Element, tag: str, text: str | None = None, **attrs: str) -> Element:
    child = etree.SubElement(parent, tag, attrs)
    if text is not None:
        child.text = text
    return child


def build_domain(spec: DomainSpec) -> Element:
    """A new domain definition for a server (used at create; rebuild edits in place)."""
    root = etree.Element("domain", type=spec.domain_type)
    _sub(root, "name", spec.name)
    _sub(root, "uuid", spec.uuid)
    write_metadata(root, spec.metadata)
    _sub(root, "memory", str(spec.memory_mib), unit="MiB")
    _sub(root, "vcpu", str(spec.vcpus))
    os_el = _sub(root, "os")
    _sub(os_el, "type", "hvm", arch="x86_64")
    _sub(os_el, "boot", dev="hd")
    features = _sub(root, "features")
    _sub(features, "acpi")
    _sub(root, "on_poweroff", "destroy")
    _sub(root, "on_reboot", "restart")
    _sub(root, "on_crash", "destroy")
    devices = _sub(root, "devices")
    for disk in spec.disks:
        add_disk(root, disk)
    if spec.interface != "none":
        iface = _sub(devices, "interface", type=spec.interface)
        if spec.mac:
            _sub(iface, "mac", address=spec.mac)
        if spec.interface == "network":
            _sub(iface, "source", network=spec.network)
        _sub(iface, "model", type="virtio")
    serial = _sub(devices, "serial", type="pty")
    if spec.console_log is not None:
        # append: a rebuild's shutdown and the next boot are both kept (QEMU truncates else)
        _sub(serial, "log", file=spec.console_log, append="on")
    _sub(serial, "target", port="0")
    console = _sub(devices, "console", type="pty")
    _sub(console, "target", type="serial", port="0")
    return root


def set_metadata(root: Element, items: tuple[tuple[str, str], ...]) -> None:
    """Write rebuildd's own ``<metadata>`` child, leaving other namespaces' children alone."""
    metadata = root.find("metadata")
    if metadata is None:
        metadata = etree.Element("metadata")
        name = root.find("uuid")
        anchor = name if name is not None else root.find("name")
        if anchor is not None:
            anchor.addnext(metadata)
        else:
            root.insert(0, metadata)
    for old in metadata.findall(f"{{{REBUILDD_NS}}}instance"):
        metadata.remove(old)
    ours = etree.SubElement(metadata, f"{{{REBUILDD_NS}}}instance", nsmap={"rebuildd": REBUILDD_NS})
    for key, value in items:
        etree.SubElement(ours, f"{{{REBUILDD_NS}}}{key}").text = value


def write_metadata(root: Element, metadata: Metadata) -> None:
    set_metadata(root, metadata.items)
    if metadata.server is not None:
        image_id = metadata.image_id or metadata.server.image_ref
        previous = novameta.read(root)  # Nova's ports and owner names, on an adopted domain
        novameta.write(root, novameta.for_server(metadata.server, image_id, previous=previous))


def interfaces(root: Element) -> list[tuple[str, str]]:
    """(MAC address, type) of each ``<interface>`` (libvirt fills in a MAC at define)."""
    found = []
    for iface in root.iterfind("devices/interface"):
        mac = iface.find("mac")
        found.append((mac.get("address", "") if mac is not None else "", iface.get("type", "")))
    return found


def get_metadata(root: Element) -> dict[str, str]:
    ours = root.find(f"metadata/{{{REBUILDD_NS}}}instance")
    if ours is None:
        return {}
    return {etree.QName(child).localname: child.text or "" for child in ours}


def disk_targets(root: Element) -> list[str]:
    return [t.get("dev", "") for t in root.iterfind("devices/disk/target")]


def find_disk(root: Element, target: str) -> Element | None:
    for disk in root.iterfind("devices/disk"):
        tgt = disk.find("target")
        if tgt is not None and tgt.get("dev") == target:
            return disk
    return None


def disk_source(disk: Element) -> str | None:
    source = disk.find("source")
    if source is None:
        return None
    return source.get("file") or source.get("dev") or source.get("name")


def remove_disk(root: Element, target: str) -> Element | None:
    """Remove the disk on ``target``; return it (to put back on undo), or None if absent."""
    disk = find_disk(root, target)
    if disk is None:
        return None
    parent = disk.getparent()
    assert parent is not None
    parent.remove(disk)
    disk.tail = None
    return disk


def disk_element(spec: DiskSpec) -> Element:
    disk = etree.Element("disk", type="file", device=spec.device)
    _sub(disk, "driver", name="qemu", type=spec.fmt)
    _sub(disk, "source", file=spec.path)
    _sub(disk, "target", dev=spec.target, bus=spec.bus)
    if spec.readonly:
        _sub(disk, "readonly")
    return disk


def renewed(old: Element | str, new: DiskSpec | Element) -> Element:
    """The disk ``old`` was, now on ``new``'s source and format: everything else of it (boot
    order, driver cache/io/discard, serial, address, iotune) is kept, as virt-manager edits
    a disk; a stale ``<backingStore>`` goes (libvirt reads the new file's own chain)."""
    fresh = disk_element(new) if isinstance(new, DiskSpec) else new
    disk = copy.deepcopy(parse(old) if isinstance(old, str) else old)
    disk.set("type", fresh.get("type", "file"))
    for tag in ("source", "driver"):
        replacement = fresh.find(tag)
        current = disk.find(tag)
        if replacement is None:
            continue
        if current is None:
            disk.insert(0 if tag == "driver" else 1, copy.deepcopy(replacement))
        else:
            merged = copy.deepcopy(current)
            for attribute in ("file", "dev", "name", "protocol"):
                merged.attrib.pop(attribute, "")
            if tag == "source":
                for child in list(merged):
                    merged.remove(child)  # a network source's hosts, say
            merged.attrib.update(replacement.attrib)
            current.addprevious(merged)
            disk.remove(current)
    for stale in disk.findall("backingStore"):
        disk.remove(stale)
    disk.tail = None
    return disk


def add_disk(root: Element, disk: DiskSpec | Element) -> Element:
    """Add a disk, keeping ``<disk>`` elements first in ``<devices>``, disks before cdroms,
    each in target order.

    An existing disk on the same target is replaced, so adding is idempotent. (libvirt
    re-indents the document on define, so whitespace is not kept here.)
    """
    element = disk_element(disk) if isinstance(disk, DiskSpec) else disk
    target = _target_of(element)
    devices = root.find("devices")
    if devices is None:
        devices = _sub(root, "devices")
    existing = find_disk(root, target)
    if existing is not None:
        existing.addprevious(element)
        devices.remove(existing)
        return element
    key = _order(element)
    before = [d for d in devices.findall("disk") if _order(d) < key]
    if before:
        before[-1].addnext(element)
    else:
        devices.insert(0, element)
    return element


def _order(disk: Element) -> tuple[bool, str]:
    """Disks before cdroms (Nova puts the config drive last), then by target name."""
    return (disk.get("device") == "cdrom", _target_of(disk))


def _target_of(disk: Element) -> str:
    target = disk.find("target")
    return target.get("dev", "") if target is not None else ""


def outside_disks(root: Element) -> str:
    """The document with every ``<disk>`` and rebuildd's metadata removed (for comparisons)."""
    copy = parse(to_string(root))
    for disk in copy.findall("devices/disk"):
        copy.find("devices").remove(disk)  # type: ignore[union-attr]
    for ours in copy.findall(f"metadata/{{{REBUILDD_NS}}}instance"):
        ours.getparent().remove(ours)  # type: ignore[union-attr]
    for element in copy.iter():
        element.tail = None
        if element.text is not None and not element.text.strip():
            element.text = None
    return to_string(copy)


# -- volumes ----------------------------------------------------------------------------------


def disk_target(disk: Element) -> str:
    """The ``dev`` of a ``<disk>`` element's target."""
    return _target_of(disk)


# Cinder driver types whose volume is a file on this host once connected.
FILE_VOLUME_TYPES: Final = frozenset({"file", "nfs"})


def volume_disk(
    target: str, connection_info: dict[str, object], *, volume_id: str, bus: str = "virtio"
) -> Element:
    """The ``<disk>`` of a volume from its Cinder connection_info — the ``file`` driver type,
    or ``nfs`` once connector.connect_volume has mounted the share and set the file's
    ``data.device_path`` (Nova's LibvirtNFSVolumeDriver) — with ``data.format``, the volume id
    as its serial, as Nova's libvirt volume drivers write it; read-only for ``ro`` access."""
    data = connection_info.get("data")
    kind = connection_info.get("driver_volume_type")
    if kind not in FILE_VOLUME_TYPES or not isinstance(data, dict) or not data.get("device_path"):
        raise ValueError(f"unsupported connection_info: {kind}")
    fmt = str(data.get("format") or "raw")
    disk = etree.Element("disk", type="file", device="disk")
    _sub(disk, "driver", name="qemu", type=fmt)
    _sub(disk, "source", file=str(data["device_path"]))
    _sub(disk, "target", dev=target, bus=bus)
    _sub(disk, "serial", volume_id)
    if data.get("access_mode") == "ro":
        _sub(disk, "readonly")
    return disk
