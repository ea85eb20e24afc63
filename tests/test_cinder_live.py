"""``REBUILDD_VOLUME_BACKEND=cinder`` against the real services (tests/cinder.py, keystone.py,
glance.py) on real libvirtd + QEMU: rebuildd with Keystone auth, images from Glance, volumes
from Cinder (NFS driver; the share bind-mounted where os-brick and rebuildd mount it), and the
catalog's compute endpoint pointing at it, so Cinder's ``volume-reimaged`` reaches it.

A server booted from a Cinder volume made from a Glance image, with a second Cinder volume of
data, is rebuilt at 2.93 onto another Glance image: Cinder re-images the root volume, rebuildd
waits for Cinder's event, both volumes end ``in-use`` with exactly one attachment each, the
data volume's bytes are unchanged, and Cinder never shows either volume ``available``. Cinder
stopped mid-rebuild: the rollback waits for it to return, then puts every volume back with one
attachment, and the fault names Cinder.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from lxml import etree

from tests.cinder import Cinder
from tests.conftest import require
from tests.glance import Glance
from tests.keystone import PASSWORD, Keystone
from tests.live import LiveDaemon, start_live_daemon
from tests.xmlutil import disk_sources, inactive_xml

libvirt = pytest.importorskip("libvirt")
URI = "qemu:///system"
PREFIX = "rebuildd-cinder-"
MiB = 1024**2
PATTERNS = (0xA1, 0xB2)  # the first MiB of Glance images A and B
AT_2_93 = {"OpenStack-API-Version": "compute 2.93"}
FLAVOR = {"flavor": {"name": "c1.vol", "id": "cvol", "ram": 128, "vcpus": 1, "disk": 1}}


class StopCinderAt:
    """Before a rebuild step, Cinder stops (its share stays mounted, as on a real compute
    host whose Cinder API goes away); it comes back ``down_for`` seconds later."""

    def __init__(self, cinder: Cinder) -> None:
        self.cinder = cinder
        self.step: str | None = None
        self.down_for = 3.0
        self.stopped = threading.Event()
        self.restarted = threading.Event()

    def _restart(self) -> None:
        time.sleep(self.down_for)
        self.cinder.start()
        self.restarted.set()

    async def before_step(self, job: str, step: str, server_id: str) -> None:
        if job == "rebuild" and step == self.step and not self.stopped.is_set():
            await asyncio.to_thread(self.cinder.stop, unmount=False)
            self.stopped.set()
            threading.Thread(target=self._restart, daemon=True).start()

    async def after_step(self, job: str, step: str, server_id: str) -> None:
        return None


@pytest.fixture(scope="module")
def images(cinder_glance: Glance) -> list[str]:
    return [
        cinder_glance.upload(f"cinder-{i}", pattern=p, min_disk=1)["id"]
        for i, p in enumerate(PATTERNS)
    ]


@pytest.fixture(scope="module")
def tokens(keystone: Keystone) -> dict[str, str]:
    return {"demo": keystone.token("demo-member", "demo")}


@pytest.fixture(scope="module")
def stopper(cinder: Cinder) -> Iterator[StopCinderAt]:
    hook = StopCinderAt(cinder)
    yield hook
    if hook.stopped.is_set():
        hook.restarted.wait(120)


@pytest.fixture(scope="module")
def live(
    keystone: Keystone,
    cinder: Cinder,
    cinder_glance: Glance,
    images: list[str],
    tokens: dict[str, str],
    stopper: StopCinderAt,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveDaemon]:
    """rebuildd on QEMU with Keystone auth, Glance images and Cinder volumes, both found
    through the catalog (no REBUILDD_GLANCE_URL, no REBUILDD_CINDER_URL), and in the catalog
    as the compute endpoint."""
    try:
        libvirt.open(URI).close()
    except libvirt.libvirtError as exc:
        require("libvirtd with the QEMU driver", str(exc))
    keystone.point_catalog_at("http://127.0.0.1:9/unset", image_url=cinder_glance.url)
    daemon = start_live_daemon(
        tmp_path_factory.mktemp("rebuildd"),
        observer=stopper,
        libvirt_uri=URI,
        domain_type="qemu",
        domain_name_prefix=PREFIX,
        shutdown_timeout=1.0,  # an OS-less guest ignores ACPI; it is destroyed after this
        auth="keystone",
        keystone_url=keystone.url,
        keystone_username="rebuildd",
        keystone_password=PASSWORD,
        keystone_project_name="service",
        image_backend="glance",
        volume_backend="cinder",
        nfs_mount_point_base=str(cinder.mount_base),
        reimage_timeout_per_gb=60.0,
    )
    keystone.point_catalog_at(daemon.url, image_url=cinder_glance.url)
    assert getattr(daemon.daemon.services.images, "url", None) == cinder_glance.url
    daemon.image_ids.extend(images)
    admin = {"X-Auth-Token": keystone.admin_token}
    assert daemon.client.post("/v2.1/flavors", json=FLAVOR, headers=admin).status_code == 200
    daemon.client.headers["X-Auth-Token"] = tokens["demo"]
    try:
        yield daemon
    finally:
        for server in daemon.client.get("/v2.1/servers").json()["servers"]:
            daemon.client.delete(f"/v2.1/servers/{server['id']}")
        deadline = time.monotonic() + 120
        while daemon.client.get("/v2.1/servers").json()["servers"]:
            assert time.monotonic() < deadline, "servers not deleted"
            time.sleep(0.1)
        daemon.stop()


# -- helpers -------------------------------------------------------------------------------------


def _cinder(cinder: Cinder, keystone: Keystone, tokens: dict[str, str]) -> httpx.Client:
    return cinder.client(tokens["demo"], keystone.projects["demo"])


def _attachments(client: httpx.Client, volume_id: str) -> list[dict[str, Any]]:
    response = client.get("/attachments/detail", params={"volume_id": volume_id})
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()["attachments"]
    return found


def _assert_attached_once(client: httpx.Client, volume_id: str, server_id: str) -> None:
    volume = client.get(f"/volumes/{volume_id}").json()["volume"]
    assert volume["status"] == "in-use", volume
    attachments = _attachments(client, volume_id)
    assert [(a["status"], a["instance"]) for a in attachments] == [("attached", server_id)]


def _sha(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(MiB), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _first_mib(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(MiB)


def _xml(server_id: str) -> etree._Element:
    return inactive_xml(URI, f"{PREFIX}{server_id}")


def _create(live: LiveDaemon, mappings: list[dict[str, Any]], image: str | None = None) -> str:
    body: dict[str, Any] = {"name": "vm", "flavorRef": "cvol", "block_device_mapping_v2": mappings}
    if image is not None:
        body["imageRef"] = image
    response = live.client.post("/v2.1/servers", json={"server": body})
    assert response.status_code == 202, response.text
    server_id: str = response.json()["server"]["id"]
    live.wait_for(server_id, "ACTIVE")
    return server_id


def _volume_mapping(volume_id: str, boot_index: int) -> dict[str, Any]:
    return {"uuid": volume_id, "source_type": "volume", "destination_type": "volume",
            "boot_index": boot_index, "delete_on_termination": False}  # fmt: skip


def _data_volume(cinder: Cinder, keystone: Keystone, tokens: dict[str, str]) -> tuple[str, str]:
    """A blank Cinder volume with a pattern written at 3 MiB; its id and its file's digest."""
    data = cinder.create_volume(tokens["demo"], keystone.projects["demo"], 1)
    with cinder.volume_path(data["id"]).open("r+b") as f:
        f.seek(3 * MiB)
        f.write(b"\x5d" * MiB)
    return data["id"], _sha(cinder.volume_path(data["id"]))


class Watch:
    """Cinder's status of some volumes, polled from another thread while a rebuild runs."""

    def __init__(self, client: httpx.Client, volume_ids: list[str]) -> None:
        self.client, self.volume_ids = client, volume_ids
        self.statuses: set[str] = set()
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for volume_id in self.volume_ids:
                response = self.client.get(f"/volumes/{volume_id}")
                if response.status_code == 200:
                    self.statuses.add(response.json()["volume"]["status"])
            self.polls += 1
            time.sleep(0.02)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


# -- the tests -------------------------------------------------------------------------------------


@pytest.mark.qemu
def test_a_volume_backed_server_with_a_data_volume_is_reimaged_by_cinder_at_2_93(
    live: LiveDaemon, cinder: Cinder, keystone: Keystone, tokens: dict[str, str]
) -> None:
    """Booted from a Cinder volume made from Glance image A, with a Cinder data volume: the
    rebuild at 2.93 onto image B has Cinder re-image the root volume (its image metadata and
    its first MiB are B's), rebuildd receives volume-reimaged, and both volumes end in-use
    with one attachment each, the data volume's bytes unchanged, never available meanwhile."""
    image_a, image_b = live.image_ids
    client = _cinder(cinder, keystone, tokens)
    root = cinder.create_volume(tokens["demo"], keystone.projects["demo"], 1, image_a)
    assert root["volume_image_metadata"]["image_id"] == image_a
    data_id, digest = _data_volume(cinder, keystone, tokens)
    server_id = _create(live, [_volume_mapping(root["id"], 0), _volume_mapping(data_id, -1)])
    sources = disk_sources(_xml(server_id))
    assert sources["vda"] == cinder.mount_point / f"volume-{root['id']}"
    assert sources["vdb"] == cinder.mount_point / f"volume-{data_id}"
    assert _first_mib(cinder.volume_path(root["id"])) == bytes([PATTERNS[0]]) * MiB
    for volume_id in (root["id"], data_id):
        _assert_attached_once(client, volume_id, server_id)

    with Watch(client, [root["id"], data_id]) as watch:
        response = live.client.post(
            f"/v2.1/servers/{server_id}/action",
            json={"rebuild": {"imageRef": image_b}},
            headers=AT_2_93,
        )
        assert response.status_code == 202, response.text
        server = live.wait_for(server_id, "ACTIVE")
    request_id = response.headers["x-compute-request-id"]

    assert watch.polls > 5 and "available" not in watch.statuses, watch.statuses
    assert server["image"] == ""
    shown = client.get(f"/volumes/{root['id']}").json()["volume"]
    assert shown["volume_image_metadata"]["image_id"] == image_b
    assert _first_mib(cinder.volume_path(root["id"])) == bytes([PATTERNS[1]]) * MiB
    assert _sha(cinder.volume_path(data_id)) == digest
    for volume_id in (root["id"], data_id):
        _assert_attached_once(client, volume_id, server_id)
    sources = disk_sources(_xml(server_id))
    assert sources["vda"] == cinder.mount_point / f"volume-{root['id']}"
    assert sources["vdb"] == cinder.mount_point / f"volume-{data_id}"
    action = live.client.get(  # the events are an admin's to see (Nova's policy)
        f"/v2.1/servers/{server_id}/os-instance-actions/{request_id}",
        headers={"X-Auth-Token": keystone.admin_token},
    )
    events = action.json()["instanceAction"]["events"]
    assert events and all(e["result"] == "Success" for e in events), events
    live.client.delete(f"/v2.1/servers/{server_id}")


@pytest.mark.qemu
def test_cinder_stopped_mid_rebuild_rolls_back_once_it_returns_with_a_fault_naming_it(
    live: LiveDaemon,
    cinder: Cinder,
    keystone: Keystone,
    tokens: dict[str, str],
    stopper: StopCinderAt,
) -> None:
    """Cinder stops just before the new attachment is connected (old attachment already
    deleted): the rebuild fails naming Cinder, its rollback waits for Cinder to return, then
    the data volume is in-use with exactly one attachment, its bytes unchanged, back on vdb of
    the server, which is in ERROR (with the fault) on its old image and old root disk."""
    image_a, image_b = live.image_ids
    client = _cinder(cinder, keystone, tokens)
    data_id, digest = _data_volume(cinder, keystone, tokens)
    server_id = _create(live, [_volume_mapping(data_id, -1)], image=image_a)
    old_root = disk_sources(_xml(server_id))["vda"]
    stopper.step = "block_device_mapping"

    response = live.client.post(
        f"/v2.1/servers/{server_id}/action", json={"rebuild": {"imageRef": image_b}}
    )
    assert response.status_code == 202, response.text
    server = live.poll(
        server_id, lambda s: s["OS-EXT-STS:task_state"] is None, "settled", allow_error=True
    )
    assert stopper.stopped.is_set() and stopper.restarted.wait(120)

    assert server["status"] == "ERROR", server  # REBUILDD_FAILED_REBUILD_STATE's default
    assert server["image"]["id"] == image_a
    fault = live.run(live.daemon.store.latest_faults([server_id]))[server_id]
    assert f"The volume service (Cinder at {cinder.url.removesuffix('/v3')})" in fault.message
    _assert_attached_once(client, data_id, server_id)
    assert _sha(cinder.volume_path(data_id)) == digest
    sources = disk_sources(_xml(server_id))
    assert sources == {"vda": old_root, "vdb": cinder.mount_point / f"volume-{data_id}"}
    assert live.run(live.daemon.hypervisor.power_state(f"{PREFIX}{server_id}")) == 1
