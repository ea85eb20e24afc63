"""The tiny real guest (tests/test_real_guest.py) with a real Cinder data volume (NFS driver,
tests/cinder.py) and its images in a real Glance: what the guest reads from the volume, its
serial and first bytes, is the same before and after a rebuild onto image B."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.cinder import Cinder
from tests.glance import Glance
from tests.keystone import PASSWORD, Keystone
from tests.live import LiveDaemon, start_live_daemon
from tests.test_real_guest import (
    SHUTDOWN_TIMEOUT,
    URI,
    Console,
    build_guest_images,
)

pytestmark = pytest.mark.qemu
PREFIX = "rebuildd-guestc-"
FLAVOR = {"flavor": {"name": "g1.cinder", "id": "gcinder", "ram": 128, "vcpus": 1, "disk": 1}}


def _glance_image(glance: Glance, name: str, data: bytes) -> str:
    image = glance.create(name=name, disk_format="raw", container_format="bare", min_disk=1)
    with glance.client() as client:
        response = client.put(
            f"/v2/images/{image['id']}/file",
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        )
    assert response.status_code == 204, response.text
    return str(image["id"])


@pytest.fixture(scope="module")
def live(
    keystone: Keystone,
    cinder: Cinder,
    cinder_glance: Glance,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveDaemon]:
    """rebuildd with Keystone auth, the guest's images in Glance and volumes in Cinder, its
    consoles logged; the demo user's token on its client."""
    guest = build_guest_images()
    images = [
        _glance_image(cinder_glance, f"tinyguest-{tag}", path.read_bytes())
        for tag, path in (("A", guest.a), ("B", guest.b))
    ]
    state = tmp_path_factory.mktemp("guest-cinder")
    (state / "consoles").mkdir()
    keystone.point_catalog_at("http://127.0.0.1:9/unset", image_url=cinder_glance.url)
    daemon = start_live_daemon(
        state / "state",
        libvirt_uri=URI,
        domain_type="auto",
        domain_name_prefix=PREFIX,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
        console_log_dir=state / "consoles",
        auth="keystone",
        keystone_url=keystone.url,
        keystone_username="rebuildd",
        keystone_password=PASSWORD,
        keystone_project_name="service",
        image_backend="glance",
        volume_backend="cinder",
        nfs_mount_point_base=str(cinder.mount_base),
    )
    keystone.point_catalog_at(daemon.url, image_url=cinder_glance.url)
    daemon.image_ids.extend(images)
    daemon.extra["consoles"] = state / "consoles"
    admin = {"X-Auth-Token": keystone.admin_token}
    assert daemon.client.post("/v2.1/flavors", json=FLAVOR, headers=admin).status_code == 200
    daemon.client.headers["X-Auth-Token"] = keystone.token("demo-member", "demo")
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


def test_a_cinder_data_volume_keeps_its_serial_and_bytes(
    live: LiveDaemon, cinder: Cinder, keystone: Keystone
) -> None:
    """A Cinder data volume shows the guest the same serial and first bytes before and after a
    rebuild onto B."""
    token = str(live.client.headers["X-Auth-Token"])
    volume = cinder.create_volume(token, keystone.projects["demo"], 1)
    with cinder.volume_path(volume["id"]).open("r+b") as data:  # what a user had written
        data.write(f"CINDER-DATA-{volume['id']}".encode())
    mapping: dict[str, Any] = {"uuid": volume["id"], "source_type": "volume",
                               "destination_type": "volume", "boot_index": -1,
                               "delete_on_termination": False}  # fmt: skip
    body = {"name": "guest-cinder", "imageRef": live.image_ids[0], "flavorRef": "gcinder",
            "config_drive": True, "block_device_mapping_v2": [mapping]}  # fmt: skip
    response = live.client.post("/v2.1/servers", json={"server": body})
    assert response.status_code == 202, response.text
    server_id = response.json()["server"]["id"]
    live.wait_for(server_id, "ACTIVE")
    console = Console(live.extra["consoles"] / f"{PREFIX}{server_id}.log")
    before = console.ready(1)
    assert before.fact("BOOTED", "tag") == "A"
    assert before.fact("VOLUME", "serial") == volume["id"][:20]  # virtio-blk keeps 20 bytes
    assert before.fact("VOLUME", "head").startswith(f"CINDER-DATA-{volume['id']}")

    response = live.client.post(
        f"/v2.1/servers/{server_id}/action", json={"rebuild": {"imageRef": live.image_ids[1]}}
    )
    assert response.status_code == 202, response.text
    live.wait_for(server_id, "ACTIVE")
    after = console.ready(2)
    assert after.fact("BOOTED", "tag") == "B"
    assert after.facts("VOLUME", "serial") == before.facts("VOLUME", "serial")
    assert after.facts("VOLUME", "head") == before.facts("VOLUME", "head")
