"""Volumes on real libvirtd + QEMU: a live attach to a running guest, a verified detach that
refuses to leave half a state when the guest (with no OS) never lets go, a detach from a
stopped guest, and the volume's bytes unchanged through all of it."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require
from tests.live import POLL_INTERVAL, LiveDaemon, start_live_daemon
from tests.xmlutil import disk_sources, parse

libvirt = pytest.importorskip("libvirt")
URI = "qemu:///system"
V = "/volume/v3/demo/volumes"
DATA = os.urandom(4096)

pytestmark = pytest.mark.qemu


@pytest.fixture
def qemu(tmp_path: Path) -> Iterator[LiveDaemon]:
    try:
        libvirt.open(URI).close()
    except libvirt.libvirtError as exc:
        require("libvirtd with the QEMU driver", str(exc))
    live = start_live_daemon(
        tmp_path,
        libvirt_uri=URI,
        domain_type="qemu",
        domain_name_prefix="rebuildd-test-",
        shutdown_timeout=1.0,
        volume_detach_timeout=1.0,
    )
    flavor = {"flavor": {"name": "t1.qemu", "id": "qemu", "ram": 128, "vcpus": 1, "disk": 1}}
    assert live.client.post("/v2.1/flavors", json=flavor).status_code == 200
    try:
        yield live
    finally:
        for server in live.client.get("/v2.1/servers").json()["servers"]:
            live.client.delete(f"/v2.1/servers/{server['id']}")
        live.stop()


def _vdb(server_id: str, *, live_xml: bool) -> Path | None:
    """The file on vdb in the domain's live or persistent XML (None: no such disk)."""
    conn = libvirt.open(URI)
    try:
        dom = conn.lookupByUUIDString(server_id)
        flags = 0 if live_xml else libvirt.VIR_DOMAIN_XML_INACTIVE
        return disk_sources(parse(str(dom.XMLDesc(flags)))).get("vdb")
    finally:
        conn.close()


def _volume(live: LiveDaemon, volume_id: str) -> dict[str, Any]:
    body: dict[str, Any] = live.client.get(f"{V}/{volume_id}").json()["volume"]
    return body


def _wait(live: LiveDaemon, volume_id: str, status: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        volume = _volume(live, volume_id)
        if volume["status"] == status:
            return volume
        time.sleep(POLL_INTERVAL)
    raise AssertionError(f"volume never reached {status}")


def _path(live: LiveDaemon, volume_id: str) -> Path:
    volumes = live.daemon.services.volumes
    assert volumes is not None  # the local backend
    return volumes.path(volume_id)


def test_live_attach_verified_detach_and_bytes(qemu: LiveDaemon) -> None:
    """Attached live to the running guest (live and persistent XML); a live detach the OS-less
    guest never completes fails and leaves it attached and in-use; stopped, it detaches; the
    bytes written into the volume file are the same at the end."""
    server_id = qemu.create_server(flavor="qemu")
    response = qemu.client.post(V, json={"volume": {"size": 1, "name": "data"}})
    volume_id = response.json()["volume"]["id"]
    path = _path(qemu, volume_id)
    with path.open("r+b") as f:
        f.seek(1024 * 1024)
        f.write(DATA)

    attach = {"volumeAttachment": {"volumeId": volume_id}}
    response = qemu.client.post(f"/v2.1/servers/{server_id}/os-volume_attachments", json=attach)
    assert response.status_code == 200, response.text
    _wait(qemu, volume_id, "in-use")
    qemu.wait_for(server_id, "ACTIVE")
    for live_xml in (True, False):
        assert _vdb(server_id, live_xml=live_xml) == path

    detach = f"/v2.1/servers/{server_id}/os-volume_attachments/{volume_id}"
    assert qemu.client.delete(detach).status_code == 202
    qemu.wait_for(server_id, "ACTIVE")
    volume = _volume(qemu, volume_id)
    assert volume["status"] == "in-use" and len(volume["attachments"]) == 1
    for live_xml in (True, False):
        assert _vdb(server_id, live_xml=live_xml) == path
    actions = qemu.client.get(f"/v2.1/servers/{server_id}/os-instance-actions").json()
    assert [a["action"] for a in actions["instanceActions"]][:2] == [
        "detach_volume",
        "attach_volume",
    ]

    stop = qemu.client.post(f"/v2.1/servers/{server_id}/action", json={"os-stop": None})
    assert stop.status_code == 202
    qemu.wait_for(server_id, "SHUTOFF")
    assert qemu.client.delete(detach).status_code == 202
    assert _wait(qemu, volume_id, "available")["attachments"] == []
    qemu.wait_for(server_id, "SHUTOFF")
    assert _vdb(server_id, live_xml=False) is None
    with path.open("rb") as f:
        f.seek(1024 * 1024)
        assert f.read(len(DATA)) == DATA
