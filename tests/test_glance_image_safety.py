"""Hostile images served by a real Glance (tests/glance.py) never reach qemu: the image cache
inspects its own copy of Glance's bytes before any qemu-img, on the test driver
(test:///default; the disks are real files).

Glance 33 itself refuses these files at upload (415 "Image failed safety checks"), so each is
planted as an image uploaded to a Glance from before its own check would be: a plain upload,
then the crafted bytes in Glance's file store and their size and hashes in Glance's database.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import glance as real_glance
from tests import hostile_images as hostile
from tests.conftest import require
from tests.glance import Glance, start_glance
from tests.live import LiveDaemon, start_live_daemon

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


@pytest.fixture
def live(tmp_path: Path, glance: Glance) -> Iterator[LiveDaemon]:
    """rebuildd on test:///default whose images are Glance's (image_ids: a plain qcow2)."""
    live = start_live_daemon(tmp_path / "state", image_backend="glance", glance_url=glance.url)
    live.image_ids.append(glance.upload("plain", pattern=0xAA)["id"])
    assert live.client.post("/v2.1/flavors", json=FLAVOR).status_code == 200
    try:
        yield live
    finally:
        live.stop()


def _plant(glance: Glance, data: bytes, disk_format: str, tmp_path: Path) -> str:
    """An active Glance image of ``disk_format`` whose bytes (and size and hashes) are ``data``."""
    image = glance.create(name="planted", disk_format=disk_format, container_format="bare")
    placeholder = tmp_path / "placeholder"
    if disk_format == "raw":
        placeholder.write_bytes(b"\0" * 4096)
    else:
        hostile.plain_qcow2(placeholder)
    with glance.client() as client:
        response = client.put(
            f"/v2/images/{image['id']}/file",
            content=placeholder.read_bytes(),
            headers={"Content-Type": "application/octet-stream"},
        )
    assert response.status_code == 204, response.text
    (glance.store_dir / image["id"]).write_bytes(data)
    with sqlite3.connect(glance.base / "glance.db") as db:
        db.execute(
            "UPDATE images SET size = ?, checksum = ?, os_hash_algo = 'sha512', "
            "os_hash_value = ? WHERE id = ?",
            (
                len(data),
                hashlib.md5(data, usedforsecurity=False).hexdigest(),
                hashlib.sha512(data).hexdigest(),
                image["id"],
            ),
        )
    assert glance.show(image["id"])["os_hash_value"] == hashlib.sha512(data).hexdigest()
    return str(image["id"])


def _fault(live: LiveDaemon, server_id: str) -> str:
    return str(live.run(live.daemon.store.latest_faults([server_id]))[server_id].message)


def _settled(live: LiveDaemon, server_id: str) -> dict[str, Any]:
    return live.poll(
        server_id, lambda s: s["OS-EXT-STS:task_state"] is None, "settled", allow_error=True
    )


# (crafted file, the disk_format Glance has for it, what the refusal names)
CASES = [
    ("qcow2-data-file", "qcow2", "data_file"),
    ("qcow2-data-file", "raw", "its content is qcow2"),
    ("qcow2-backing-file", "qcow2", "backing file"),
]


def _crafted(tmp_path: Path, name: str) -> bytes:
    craft = {
        "qcow2-data-file": hostile.qcow2_with_data_file,
        "qcow2-backing-file": hostile.qcow2_with_backing_file,
    }[name]
    return craft(tmp_path / f"{name}.img", hostile.marker(tmp_path))


@pytest.mark.parametrize(("name", "disk_format", "reason"), CASES)
def test_a_server_from_a_hostile_glance_image_fails_naming_the_reason(
    live: LiveDaemon, glance: Glance, tmp_path: Path, name: str, disk_format: str, reason: str
) -> None:
    """Create from a Glance image whose bytes point at a host file: ERROR, a fault naming the
    image and the reason, and nothing of it left in the cache."""
    image_id = _plant(glance, _crafted(tmp_path, name), disk_format, tmp_path)
    body = {"server": {"name": "vm", "imageRef": image_id, "flavorRef": "g1"}}
    response = live.client.post("/v2.1/servers", json=body)
    assert response.status_code == 202, response.text
    server_id = response.json()["server"]["id"]
    live.wait_for(server_id, "ERROR")
    fault = _fault(live, server_id)
    assert f"Image {image_id} is unacceptable" in fault and reason in fault
    assert not any((live.settings.state_dir / "_base").glob(f"{image_id}*"))


def test_a_rebuild_onto_a_hostile_glance_image_keeps_the_old_disk(
    live: LiveDaemon, glance: Glance, tmp_path: Path
) -> None:
    """A rebuild onto a Glance qcow2 with a host data file rolls back: ERROR on the old image
    and its old root disk, one Error event and a fault naming the reason; the disk the guest
    has shows no byte of the host file."""
    image_id = _plant(glance, _crafted(tmp_path, "qcow2-data-file"), "qcow2", tmp_path)
    server_id = live.create_server(flavor="g1")
    live.wait_for(server_id, "ACTIVE")
    instance_dir = live.settings.state_dir / "instances" / server_id
    disks = sorted(instance_dir.iterdir())
    response = live.client.post(
        f"/v2.1/servers/{server_id}/action", json={"rebuild": {"imageRef": image_id}}
    )
    assert response.status_code == 202, response.text
    request_id = response.headers["x-compute-request-id"]
    server = _settled(live, server_id)
    assert (server["status"], server["image"]["id"]) == ("ERROR", live.image_ids[0])
    assert sorted(instance_dir.iterdir()) == disks
    assert "data_file" in _fault(live, server_id)
    detail = live.client.get(f"/v2.1/servers/{server_id}/os-instance-actions/{request_id}")
    events = detail.json()["instanceAction"]["events"]
    assert len([e for e in events if e["result"] == "Error"]) == 1
    for disk in disks:
        assert hostile.MARKER_BYTES[:32] not in hostile.readable_bytes(disk)


def test_a_volume_from_a_hostile_glance_image_is_refused(
    live: LiveDaemon, glance: Glance, tmp_path: Path
) -> None:
    """A local volume from a Glance qcow2 with a host data file is a 400 naming the reason,
    and no volume file shows a byte of the host file."""
    image_id = _plant(glance, _crafted(tmp_path, "qcow2-data-file"), "qcow2", tmp_path)
    response = live.client.post(
        "/volume/v3/demo/volumes", json={"volume": {"size": 1, "imageRef": image_id}}
    )
    assert response.status_code == 400, response.text
    assert "data_file" in response.json()["badRequest"]["message"]
    for path in (live.settings.state_dir / "volumes").rglob("*"):
        if path.is_file():
            assert hostile.MARKER_BYTES[:32] not in path.read_bytes()


def test_a_glance_image_in_a_format_rebuildd_does_not_take_is_refused(
    live: LiveDaemon, glance: Glance, tmp_path: Path
) -> None:
    """A plain VMDK that Glance accepts is still not raw or qcow2: the create fails with a
    fault saying which formats are accepted."""
    path = tmp_path / "plain.vmdk"
    hostile.plain_vmdk(path)
    image = glance.create(name="vmdk", disk_format="vmdk", container_format="bare")
    with glance.client() as client:
        response = client.put(
            f"/v2/images/{image['id']}/file",
            content=path.read_bytes(),
            headers={"Content-Type": "application/octet-stream"},
        )
    assert response.status_code == 204, response.text
    body = {"server": {"name": "vm", "imageRef": image["id"], "flavorRef": "g1"}}
    response = live.client.post("/v2.1/servers", json=body)
    assert response.status_code == 202, response.text
    server_id = response.json()["server"]["id"]
    live.wait_for(server_id, "ERROR")
    assert "only qcow2, raw are accepted" in _fault(live, server_id)


def test_an_image_larger_than_the_flavors_disk_fails_the_create_once_its_size_is_known(
    live: LiveDaemon, glance: Glance, tmp_path: Path
) -> None:
    """A 2 GiB qcow2 whose virtual size Glance does not report passes the api stage on a 1 GiB
    flavor; once fetched, its size fails the create with Nova's FlavorDiskSmallerThanImage."""
    image_id = _plant(glance, hostile.plain_qcow2(tmp_path / "big.qcow2", "2G"), "qcow2", tmp_path)
    with sqlite3.connect(glance.base / "glance.db") as db:
        db.execute("UPDATE images SET virtual_size = NULL WHERE id = ?", (image_id,))
    assert glance.show(image_id)["virtual_size"] is None
    body = {"server": {"name": "vm", "imageRef": image_id, "flavorRef": "g1"}}
    response = live.client.post("/v2.1/servers", json=body)
    assert response.status_code == 202, response.text
    server_id = response.json()["server"]["id"]
    live.wait_for(server_id, "ERROR")
    assert "Flavor's disk is too small for requested image" in _fault(live, server_id)
