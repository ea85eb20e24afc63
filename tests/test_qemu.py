"""A rebuild on real libvirtd + QEMU (started by ``make test``): the guest runs again on a new
overlay of the new image's base; the old root disk outlives the new domain's start; the domain
XML outside ``<disk>`` is unchanged."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from lxml import etree

from tests.conftest import require
from tests.live import LiveDaemon, start_live_daemon
from tests.xmlutil import backing_file, disk_source, outside_disks

libvirt = pytest.importorskip("libvirt")
URI = "qemu:///system"
FOREIGN_NS = "https://example.org/not-rebuildd"


@dataclass(frozen=True)
class Boundary:
    job: str
    step: str
    phase: str
    old_disk_exists: bool
    domain_active: bool


class Recorder:
    """Records, at every step boundary, whether the old disk exists and the domain runs."""

    def __init__(self) -> None:
        self.old_disk: Path | None = None
        self.domain: str | None = None
        self.boundaries: list[Boundary] = []
        self._lock = threading.Lock()
        self._conn = libvirt.open(URI)

    def _record(self, job: str, step: str, phase: str) -> None:
        if job != "rebuild" or self.old_disk is None or self.domain is None:
            return
        active = bool(self._conn.lookupByName(self.domain).isActive())
        with self._lock:
            self.boundaries.append(Boundary(job, step, phase, self.old_disk.exists(), active))

    async def before_step(self, job: str, step: str, server_id: str) -> None:
        self._record(job, step, "before")

    async def after_step(self, job: str, step: str, server_id: str) -> None:
        self._record(job, step, "after")


@pytest.fixture
def qemu_daemon(tmp_path: Path) -> Iterator[tuple[LiveDaemon, Recorder]]:
    try:
        conn = libvirt.open(URI)
        conn.close()
    except libvirt.libvirtError as exc:
        require("libvirtd with the QEMU driver", str(exc))
    recorder = Recorder()
    live = start_live_daemon(
        tmp_path,
        observer=recorder,
        libvirt_uri=URI,
        domain_type="qemu",  # TCG: an OS-less guest idles instead of spinning a core
        domain_name_prefix="rebuildd-test-",
        shutdown_timeout=1.0,  # an OS-less guest ignores ACPI; it is destroyed after this
    )
    flavor = {"flavor": {"name": "t1.qemu", "id": "qemu", "ram": 128, "vcpus": 1, "disk": 1}}
    assert live.client.post("/v2.1/flavors", json=flavor).status_code == 200
    try:
        yield live, recorder
    finally:
        for server in live.client.get("/v2.1/servers").json()["servers"]:
            live.client.delete(f"/v2.1/servers/{server['id']}")
        live.stop()


def _xml(conn: object, name: str) -> etree._Element:
    dom = conn.lookupByName(name)  # type: ignore[attr-defined]
    return etree.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).encode())


@pytest.mark.qemu
def test_rebuild_on_real_qemu(qemu_daemon: tuple[LiveDaemon, Recorder]) -> None:
    """Create on QEMU, rebuild onto the other image, and check disk, order and XML fidelity."""
    live, recorder = qemu_daemon
    conn = libvirt.open(URI)
    server_id = live.create_server("qemu-vm", flavor="qemu")
    name = f"rebuildd-test-{server_id}"
    dom = conn.lookupByName(name)
    assert dom.isActive()

    # Something rebuildd does not model, added by "another tool": it must survive the rebuild.
    root = _xml(conn, name)
    metadata = root.find("metadata")
    assert metadata is not None
    etree.SubElement(
        metadata, f"{{{FOREIGN_NS}}}note", nsmap={"other": FOREIGN_NS}
    ).text = "keep me"
    conn.defineXML(etree.tostring(root, encoding="unicode"))
    before = _xml(conn, name)
    old_disk = disk_source(before)
    assert old_disk.exists()
    assert (
        before.find("devices/interface") is not None and before.find("devices/serial") is not None
    )
    recorder.old_disk, recorder.domain = old_disk, name

    response = live.client.post(
        f"/v2.1/servers/{server_id}/action",
        json={"rebuild": {"imageRef": live.image_ids[1], "name": "rebuilt"}},
    )
    assert response.status_code == 202, response.text
    assert response.json()["server"]["status"] == "REBUILD"
    server = live.wait_for(server_id, "ACTIVE")
    assert server["image"]["id"] == live.image_ids[1]

    # The domain runs again, on a new overlay whose backing file is the new image's base.
    assert conn.lookupByName(name).isActive()
    after = _xml(conn, name)
    new_disk = disk_source(after)
    assert new_disk != old_disk and new_disk.exists()
    base = live.settings.state_dir / "_base" / live.image_ids[1]
    assert backing_file(new_disk) == base

    # The old disk stayed until the new domain had started, and was removed after that.
    steps = [(b.step, b.phase) for b in recorder.boundaries]
    started = steps.index(("start_domain", "after"))
    assert all(b.old_disk_exists for b in recorder.boundaries[: started + 1])
    assert recorder.boundaries[started].domain_active
    assert steps[-1] == ("remove_old_local_disks", "after")
    assert not recorder.boundaries[-1].old_disk_exists
    assert not old_disk.exists()

    # Outside <disk> (and rebuildd's own metadata) the definition is unchanged.
    assert outside_disks(after) == outside_disks(before)
    assert after.find(f"metadata/{{{FOREIGN_NS}}}note").text == "keep me"  # type: ignore[union-attr]
    conn.close()
