"""rebuildd on ``image_backend=glance`` against a real Glance (tests/glance.py; glance 33.0.0
from the venv ``make test`` installs). On real guests (libvirtd + QEMU): servers boot from
Glance images and are rebuilt onto others, the api stage checks Glance's fields, and a corrupt
image or a Glance that stops mid-rebuild fails the rebuild cleanly, the old disk kept. On the
test driver: rebuildd's image API answers from Glance, and a Glance that is down is a 503."""

from __future__ import annotations

import asyncio
import hashlib
import re
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import glance as real_glance
from tests import test_real_clients as real_clients
from tests.conftest import require
from tests.glance import Glance, start_glance
from tests.live import LiveDaemon, start_live_daemon
from tests.xmlutil import backing_file, disk_source, parse

libvirt = pytest.importorskip("libvirt")
URI = "qemu:///system"
PREFIX = "rebuildd-glance-"
FLAVOR = {"flavor": {"name": "g1.tiny", "id": "g1", "ram": 128, "vcpus": 1, "disk": 1}}


@pytest.fixture(scope="module")
def glance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Glance]:
    """One real Glance for this module, torn down after it."""
    if not (real_glance.VENV / "bin" / "glance-manage").exists():
        require("Glance", f"no venv at {real_glance.VENV} (scripts/openstack-venvs.sh, make test)")
    started = start_glance(tmp_path_factory.mktemp("glance"))
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="module")
def glance_images(glance: Glance) -> list[dict[str, Any]]:
    """Images A and B in Glance (64 MiB qcow2, different first MiB)."""
    return [
        glance.upload("glance-image-a", pattern=0xAA),
        glance.upload("glance-image-b", pattern=0xBB),
    ]


class StopGlanceAt:
    """A step observer that stops Glance's gunicorn before one step of a rebuild, once."""

    def __init__(self, glance: Glance) -> None:
        self.glance = glance
        self.step: str | None = None
        self.stopped = threading.Event()

    async def before_step(self, job: str, step: str, server_id: str) -> None:
        if job == "rebuild" and step == self.step and not self.stopped.is_set():
            await asyncio.to_thread(self.glance.stop)
            self.stopped.set()

    async def after_step(self, job: str, step: str, server_id: str) -> None:
        return None


@pytest.fixture
def stopper(glance: Glance) -> Iterator[StopGlanceAt]:
    hook = StopGlanceAt(glance)
    try:
        yield hook
    finally:
        if glance.process is None:  # the remaining tests need it back
            glance.start()


@pytest.fixture
def live(
    tmp_path: Path, glance: Glance, glance_images: list[dict[str, Any]], stopper: StopGlanceAt
) -> Iterator[LiveDaemon]:
    """rebuildd on real QEMU whose images are Glance's (image_ids: Glance's A and B)."""
    try:
        libvirt.open(URI).close()
    except libvirt.libvirtError as exc:
        require("libvirtd with the QEMU driver", str(exc))
    live = start_live_daemon(
        tmp_path,
        observer=stopper,
        libvirt_uri=URI,
        domain_type="qemu",
        domain_name_prefix=PREFIX,
        shutdown_timeout=1.0,  # an OS-less guest ignores ACPI; it is destroyed after this
        image_backend="glance",
        glance_url=glance.url,
    )
    live.image_ids.extend(image["id"] for image in glance_images)
    assert live.client.post("/v2.1/flavors", json=FLAVOR).status_code == 200
    try:
        yield live
    finally:
        for server in live.client.get("/v2.1/servers").json()["servers"]:
            live.client.delete(f"/v2.1/servers/{server['id']}")
        deadline = time.monotonic() + 60
        while live.client.get("/v2.1/servers").json()["servers"] and time.monotonic() < deadline:
            time.sleep(0.05)
        live.stop()


def _create(live: LiveDaemon, image_id: str) -> str:
    body = {"server": {"name": "vm", "imageRef": image_id, "flavorRef": "g1"}}
    response = live.client.post("/v2.1/servers", json=body)
    assert response.status_code == 202, response.text
    server_id: str = response.json()["server"]["id"]
    live.wait_for(server_id, "ACTIVE")
    return server_id


def _rebuild(live: LiveDaemon, server_id: str, image_id: str) -> str:
    response = live.client.post(
        f"/v2.1/servers/{server_id}/action",
        json={"rebuild": {"imageRef": image_id, "name": "rebuilt"}},
    )
    assert response.status_code == 202, response.text
    return str(response.headers["x-compute-request-id"])


def _root(live: LiveDaemon, server_id: str) -> Path:
    xml = live.run(live.daemon.hypervisor.domain_xml(f"{PREFIX}{server_id}"))
    return disk_source(parse(xml))


def _downloads(live: LiveDaemon) -> float:
    text = live.client.get("/metrics").text
    match = re.search(r"^rebuildd_image_downloads_total (\S+)$", text, re.M)
    assert match is not None, text
    return float(match.group(1))


def _settled(live: LiveDaemon, server_id: str) -> dict[str, Any]:
    return live.poll(
        server_id, lambda s: s["OS-EXT-STS:task_state"] is None, "task_state None",
        allow_error=True,
    )  # fmt: skip


def _assert_rolled_back(
    live: LiveDaemon, server_id: str, request_id: str, old_disk: Path, message: str
) -> None:
    """ERROR (REBUILDD_FAILED_REBUILD_STATE's default) on the old image and the old root disk,
    running, with the fault (saying it was rolled back) and an Error event."""
    server = _settled(live, server_id)
    assert server["status"] == "ERROR"
    assert (server["image"]["id"], server["name"]) == (live.image_ids[0], "vm")
    assert _root(live, server_id) == old_disk and old_disk.exists()
    assert sorted(old_disk.parent.iterdir()) == [old_disk], "the new disk must be removed"
    assert live.run(live.daemon.hypervisor.power_state(f"{PREFIX}{server_id}")) == 1
    detail = live.client.get(f"/v2.1/servers/{server_id}/os-instance-actions/{request_id}").json()
    failed = [e for e in detail["instanceAction"]["events"] if e["result"] == "Error"]
    assert len(failed) == 1 and message in (failed[0]["traceback"] or "")
    fault = live.run(live.daemon.store.latest_faults([server_id]))[server_id]
    assert message in fault.message and "rolled back" in fault.message


@pytest.mark.qemu
def test_rebuild_onto_another_glance_image_backs_onto_its_base_fetched_once(
    live: LiveDaemon, glance: Glance
) -> None:
    """Booted from Glance image A and rebuilt onto B (twice): the root is an overlay of B's base,
    whose bytes are Glance's (its sha512), and B was fetched from Glance once."""
    server_id = _create(live, live.image_ids[0])
    assert _downloads(live) == 1
    base = live.settings.state_dir / "_base"
    assert backing_file(_root(live, server_id)) == base / live.image_ids[0]

    for _ in range(2):
        _rebuild(live, server_id, live.image_ids[1])
        server = live.wait_for(server_id, "ACTIVE")
        assert (server["image"]["id"], server["name"]) == (live.image_ids[1], "rebuilt")
        assert backing_file(_root(live, server_id)) == base / live.image_ids[1]
    assert _downloads(live) == 2, "A at the boot, B at the first rebuild only"
    digest = hashlib.sha512((base / live.image_ids[1]).read_bytes()).hexdigest()
    assert digest == glance.show(live.image_ids[1])["os_hash_value"]


@pytest.mark.qemu
def test_image_bytes_that_do_not_match_glances_hash_fail_the_rebuild_cleanly(
    live: LiveDaemon, glance: Glance
) -> None:
    """Glance serves bytes (corrupted in its store after the upload) that are not its
    os_hash_value: the rebuild rolls back, old root disk attached, ERROR, with a fault."""
    corrupt = glance.upload("glance-image-corrupt", pattern=0xCC)
    stored = glance.store_dir / corrupt["id"]
    data = bytearray(stored.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    stored.write_bytes(bytes(data))
    server_id = _create(live, live.image_ids[0])
    old_disk = _root(live, server_id)

    request_id = _rebuild(live, server_id, corrupt["id"])
    message = f"Fetching image {corrupt['id']} failed: sha512 of the data is"
    _assert_rolled_back(live, server_id, request_id, old_disk, message)
    assert not (live.settings.state_dir / "_base" / corrupt["id"]).exists()


@pytest.mark.qemu
def test_glance_stopped_mid_rebuild_rolls_back_with_a_fault_naming_it(
    live: LiveDaemon, glance: Glance, stopper: StopGlanceAt
) -> None:
    """Glance stops just before the new disks are made (the image not cached yet): the rebuild
    rolls back to the old disk, with a fault that names the image service."""
    server_id = _create(live, live.image_ids[0])
    old_disk = _root(live, server_id)
    stopper.step = "create_local_disks"

    request_id = _rebuild(live, server_id, live.image_ids[1])
    _assert_rolled_back(
        live, server_id, request_id, old_disk, f"The image service (Glance at {glance.url}) failed"
    )
    assert stopper.stopped.is_set()


@pytest.mark.qemu
def test_an_image_glance_does_not_have_is_novas_400(live: LiveDaemon) -> None:
    """Glance's 404 for the imageRef is Nova's 400 "Cannot find image for rebuild"."""
    server_id = _create(live, live.image_ids[0])
    response = live.client.post(
        f"/v2.1/servers/{server_id}/action", json={"rebuild": {"imageRef": str(uuid.uuid4())}}
    )
    assert response.status_code == 400
    assert response.json() == {
        "badRequest": {"code": 400, "message": "Cannot find image for rebuild"}
    }
    assert live.server(server_id)["status"] == "ACTIVE"


@pytest.mark.qemu
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"min_ram": 4096}, "Flavor's memory is too small for requested image."),
        ({"min_disk": 2}, "Flavor's disk is smaller than the minimum size specified in image"),
        ({"architecture": "vax"}, "Architecture name 'vax' is not recognised"),
    ],
    ids=["min_ram", "min_disk", "architecture"],
)
def test_the_api_stage_checks_glances_fields(
    live: LiveDaemon, glance: Glance, fields: dict[str, Any], message: str
) -> None:
    """A Glance image whose min_ram, min_disk or architecture the server cannot take is Nova's
    400 with Nova's message, before any change to the server."""
    image = glance.upload(f"glance-image-{next(iter(fields))}", pattern=0xDD, **fields)
    server_id = _create(live, live.image_ids[0])
    response = live.client.post(
        f"/v2.1/servers/{server_id}/action", json={"rebuild": {"imageRef": image["id"]}}
    )
    assert response.status_code == 400, response.text
    assert response.json()["badRequest"]["message"].startswith(message)
    server = live.server(server_id)
    assert (server["status"], server["image"]["id"]) == ("ACTIVE", live.image_ids[0])


# -- rebuildd's image API and the api stage on the test driver ------------------------------


@pytest.fixture
def api(
    tmp_path: Path, glance: Glance, glance_images: list[dict[str, Any]]
) -> Iterator[LiveDaemon]:
    """rebuildd on test:///default whose images are Glance's (image_ids: Glance's A and B)."""
    live = start_live_daemon(tmp_path, image_backend="glance", glance_url=glance.url)
    live.image_ids.extend(image["id"] for image in glance_images)
    try:
        yield live
    finally:
        live.stop()
        if glance.process is None:
            glance.start()


def test_the_image_api_answers_from_glance(api: LiveDaemon, glance: Glance) -> None:
    """/image/v2/images and novaclient's /v2.1/v2/images list and show Glance's images."""
    listed = api.client.get("/image/v2/images", params={"name": "glance-image-b"}).json()
    assert [i["id"] for i in listed["images"]] == [api.image_ids[1]]
    names = {i["name"] for i in api.client.get("/image/v2/images").json()["images"]}
    assert {"glance-image-a", "glance-image-b"} <= names
    expected = glance.show(api.image_ids[1])
    for path in ("/image/v2/images", "/v2.1/v2/images"):
        shown = api.client.get(f"{path}/{api.image_ids[1]}").json()
        assert {k: shown[k] for k in ("id", "name", "size", "os_hash_value", "status")} == {
            k: expected[k] for k in ("id", "name", "size", "os_hash_value", "status")
        }
    missing = api.client.get(f"/image/v2/images/{uuid.uuid4()}")
    assert missing.status_code == 404


def test_an_image_download_through_rebuildd_is_glances_bytes(
    api: LiveDaemon, glance: Glance
) -> None:
    """GET /image/v2/images/{id}/file streams the bytes Glance holds."""
    with api.client.stream("GET", f"/image/v2/images/{api.image_ids[0]}/file") as response:
        assert response.status_code == 200
        digest = hashlib.sha512()
        for chunk in response.iter_bytes():
            digest.update(chunk)
    assert digest.hexdigest() == glance.show(api.image_ids[0])["os_hash_value"]


def test_image_writes_through_rebuildd_are_refused_naming_glance(
    api: LiveDaemon, glance: Glance
) -> None:
    """Images are Glance's to create and delete: rebuildd's image API answers 403."""
    body = {"name": "x", "disk_format": "qcow2", "container_format": "bare"}
    created = api.client.post("/image/v2/images", json=body)
    assert created.status_code == 403
    assert f"in Glance at {glance.url}" in created.json()["forbidden"]["message"]
    assert api.client.delete(f"/image/v2/images/{api.image_ids[0]}").status_code == 403
    assert glance.show(api.image_ids[0])["status"] == "active"


def test_a_rebuild_while_glance_is_down_is_a_503_naming_it(api: LiveDaemon, glance: Glance) -> None:
    """Glance refusing connections at the api stage is 503 serviceUnavailable (Nova: 500),
    and the server is untouched."""
    server_id = api.create_server(image=0)
    glance.stop()
    response = api.client.post(
        f"/v2.1/servers/{server_id}/action", json={"rebuild": {"imageRef": api.image_ids[1]}}
    )
    assert response.status_code == 503, response.text
    message = response.json()["serviceUnavailable"]["message"]
    assert message.startswith(f"The image service (Glance at {glance.url}) failed: ConnectError")
    server = api.server(server_id)
    assert (server["status"], server["OS-EXT-STS:task_state"]) == ("ACTIVE", None)
    assert api.client.get("/image/v2/images").status_code == 503


def test_real_clients_rebuild_onto_a_glance_image_by_name(
    api: LiveDaemon, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """``openstack server rebuild --image NAME`` and ``nova rebuild SERVER NAME`` find the
    Glance image by name through rebuildd's image API and rebuild onto it."""
    if not (real_clients.OPENSTACK.exists() and real_clients.NOVA.exists()):
        require("openstack and nova", "python-openstackclient/novaclient (the dev extra)")
    clients = real_clients.Clients(api, tmp_path_factory.mktemp("home"), None)
    server_id = api.create_server("by-name", image=0)
    clients.openstack("server", "rebuild", "--image", "glance-image-b", "--wait", server_id)
    assert api.wait_for(server_id, "ACTIVE")["image"]["id"] == api.image_ids[1]
    out = clients.nova("rebuild", "--poll", "by-name", "glance-image-a")
    assert "Finished" in out or "ACTIVE" in out, out
    assert api.wait_for(server_id, "ACTIVE")["image"]["id"] == api.image_ids[0]
