"""Small helpers for tests about disks and domain XML, written independently of the code
under test (rebuildd.domxml, rebuildd.disks)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from lxml import etree

REBUILDD_NS = "https://rebuildd.dev/xmlns/libvirt/domain/1.0"
NOVA_NS = "http://openstack.org/xmlns/libvirt/nova/1.1"


def parse(xml: str) -> etree._Element:
    return etree.fromstring(xml.encode())


def disk_source(root: etree._Element, target: str = "vda") -> Path:
    """The file behind the disk on ``target``; exactly one must exist."""
    found = [
        disk.find("source")
        for disk in root.iterfind("devices/disk")
        if disk.find("target") is not None and disk.find("target").get("dev") == target  # type: ignore[union-attr]
    ]
    assert len(found) == 1 and found[0] is not None, f"{len(found)} disks on {target}"
    return Path(str(found[0].get("file")))


def disk_sources(root: etree._Element) -> dict[str, Path]:
    """Target -> file of every file-backed ``<disk>``, in document order."""
    found = {}
    for disk in root.iterfind("devices/disk"):
        target, source = disk.find("target"), disk.find("source")
        if target is not None and source is not None and source.get("file"):
            found[str(target.get("dev"))] = Path(str(source.get("file")))
    return found


def outside_disks(root: etree._Element) -> str:
    """The document minus <disk> elements and the metadata rebuildd writes (its own and Nova's
    nova:instance), whitespace-normalised."""
    copy = etree.fromstring(etree.tostring(root))
    devices = copy.find("devices")
    assert devices is not None
    for disk in devices.findall("disk"):
        devices.remove(disk)
    metadata = copy.find("metadata")
    if metadata is not None:
        for ns in (REBUILDD_NS, NOVA_NS):
            for ours in metadata.findall(f"{{{ns}}}*"):
                metadata.remove(ours)
    for element in copy.iter():
        element.tail = None
        if element.text is not None and not element.text.strip():
            element.text = None
    return etree.tostring(copy, encoding="unicode")


def backing_file(path: Path) -> Path:
    """The backing file of a qcow2 overlay (``-U``: the running QEMU holds a lock on it)."""
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return Path(json.loads(out)["full-backing-filename"])


def inactive_xml(uri: str, name: str) -> etree._Element:
    """A domain's persistent (inactive) XML, read straight from libvirt."""
    import libvirt

    conn = libvirt.open(uri)
    try:
        return parse(conn.lookupByName(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    finally:
        conn.close()
