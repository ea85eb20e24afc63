"""Fault injection on real libvirtd + QEMU: SIGKILL the daemon at every step boundary of a
rebuild, restart it, and check that nothing was lost.

For each boundary: after the restart (recovery runs before the API answers) the server is
ACTIVE on the new image, or back on its old disk and in ERROR with a fault saying it was
rolled back (REBUILDD_FAILED_REBUILD_STATE's default: a rebuild recovery rolls back is a failed
rebuild), its guest running as before — never REBUILD, never diskless; its domain
runs on a root disk that exists and backs onto the base of the image the server says it has;
the instance directory holds no orphaned disk; no other domain was left behind.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import require
from tests.process import DaemonProcess
from tests.xmlutil import backing_file, disk_sources, parse

libvirt = pytest.importorskip("libvirt")
URI = "qemu:///system"
REBUILD_STEPS = (
    "check_host",
    "record_power_state",
    "power_off",
    "record_local_disks",
    "reserve_volumes",
    "detach_local_disks",
    "release_old_attachments",
    "block_device_mapping",
    "plan_local_disks",
    "create_local_disks",
    "attach_local_disks",
    "complete_volume_attachments",
    "start_domain",
    "restore_power_state",
    "remove_old_local_disks",
)
BOUNDARIES = [f"{step}:{phase}" for step in REBUILD_STEPS for phase in ("before", "after")]


@pytest.fixture(scope="module")
def qemu() -> Iterator[object]:
    try:
        conn = libvirt.open(URI)
    except libvirt.libvirtError as exc:
        require("libvirtd with the QEMU driver", str(exc))
    yield conn
    conn.close()


def _create(client: httpx.Client, image_id: str) -> tuple[str, str]:
    """A server with every kind of local disk — root, ephemeral, swap and a config drive —
    and a data volume; returns the server's and the volume's ids."""
    flavor = {"flavor": {"name": "t1.fault", "id": "fault", "ram": 128, "vcpus": 1, "disk": 1,
                         "OS-FLV-EXT-DATA:ephemeral": 1, "swap": 16}}  # fmt: skip
    client.post("/v2.1/flavors", json=flavor)
    made = client.post("/volume/v3/volumes", json={"volume": {"size": 1, "name": "data"}})
    assert made.status_code == 202, made.text
    volume_id: str = made.json()["volume"]["id"]
    data = {"source_type": "volume", "destination_type": "volume", "uuid": volume_id,
            "boot_index": -1}  # fmt: skip
    body = {"server": {"name": "victim", "imageRef": image_id, "flavorRef": "fault",
                       "config_drive": True, "block_device_mapping_v2": [data]}}  # fmt: skip
    response = client.post("/v2.1/servers", json=body)
    assert response.status_code == 202, response.text
    server_id: str = response.json()["server"]["id"]
    _until(client, server_id, "ACTIVE")
    return server_id, volume_id


@pytest.mark.qemu
@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_sigkill_at_every_step_boundary(qemu: object, tmp_path: Path, boundary: str) -> None:
    """Killed at this boundary and restarted, the server is whole: ACTIVE on the new image, or
    ERROR (rolled back, its guest running) on the old one."""
    _kill_rebuild_and_restart(qemu, tmp_path, boundary, "active")


@pytest.mark.qemu
@pytest.mark.parametrize(
    ("boundary", "start_as"),
    [
        ("power_off:after", "stopped"),
        ("start_domain:after", "stopped"),
        ("restore_power_state:after", "stopped"),
        ("detach_local_disks:after", "error"),
        ("start_domain:after", "error"),
    ],
)
def test_sigkill_of_rebuilds_from_shutoff_and_error(
    qemu: object, tmp_path: Path, boundary: str, start_as: str
) -> None:
    """A stopped server ends SHUTOFF on the new image or ERROR rolled back (not running
    either way); a server rebuilt from ERROR ends ERROR on its old disk or ACTIVE on the new
    one — never stuck in REBUILD (Nova's gap)."""
    _kill_rebuild_and_restart(qemu, tmp_path, boundary, start_as)


@pytest.mark.qemu
@pytest.mark.parametrize(("setting", "status"), [("error", "ERROR"), ("previous", "ACTIVE")])
def test_recovery_rolling_a_rebuild_back_follows_failed_rebuild_state(
    qemu: Any, tmp_path: Path, setting: str, status: str
) -> None:
    """A rebuild killed before its new disks were made is rolled back by the restarted daemon
    onto the old disk, its guest running: ERROR under REBUILDD_FAILED_REBUILD_STATE=error,
    ACTIVE under previous, with an 'Interrupted' fault saying it was rolled back either way."""
    daemon = _armed_daemon(tmp_path, "create_local_disks:before")
    server_id = ""
    try:
        with daemon.client() as client:
            images = {i["name"]: i["id"] for i in client.get("/image/v2/images").json()["images"]}
            server_id, _ = _create(client, images["demo-image-a"])
            with contextlib.suppress(httpx.TransportError):
                client.post(
                    f"/v2.1/servers/{server_id}/action",
                    json={"rebuild": {"imageRef": images["demo-image-b"]}},
                )
        assert daemon.wait_exit() == -9, "the kill hook did not fire"
        daemon.start(failed_rebuild_state=setting)
        server = daemon.get(f"/v2.1/servers/{server_id}")["server"]
        assert (server["status"], server["OS-EXT-STS:task_state"]) == (status, None), server
        assert server["image"]["id"] == images["demo-image-a"]
        assert qemu.lookupByName(f"rebuildd-test-{server_id}").isActive()
        fault = server["fault"]["message"] if status == "ERROR" else _fault(daemon, server_id)
        assert fault.startswith("Interrupted") and "rolled back" in fault, fault
    finally:
        _clean_up(qemu, daemon, server_id)


def _fault(daemon: DaemonProcess, server_id: str) -> str:
    """The server's latest fault, which Nova shows only while it is in ERROR: from the
    failed action's event instead."""
    actions = daemon.get(f"/v2.1/servers/{server_id}/os-instance-actions")["instanceActions"]
    rebuild = next(a for a in actions if a["action"] == "rebuild")
    response = httpx.get(
        f"{daemon.url}/v2.1/servers/{server_id}/os-instance-actions/{rebuild['request_id']}",
        headers={"OpenStack-API-Version": "compute 2.84"},
        timeout=30,
    )
    events = response.json()["instanceAction"]["events"]
    (failed,) = [e for e in events if e["result"] == "Error"]
    return str(failed["details"])


def _set_vm_state(db: Path, server_id: str, vm_state: str) -> None:
    """Test set-up only: put a server in a state the API cannot reach directly (ERROR)."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("UPDATE servers SET vm_state = ? WHERE id = ?", (vm_state, server_id))
        conn.commit()


def _armed_daemon(tmp_path: Path, boundary: str) -> DaemonProcess:
    """A daemon on real QEMU that SIGKILLs itself at ``boundary`` of a rebuild."""
    daemon = DaemonProcess(
        tmp_path,
        libvirt_uri=URI,
        domain_type="qemu",
        domain_name_prefix="rebuildd-test-",
        shutdown_timeout="0.5",
    )
    daemon.prepare()
    daemon.start(kill_at=f"rebuild:{boundary}")
    return daemon


def _kill_rebuild_and_restart(qemu: Any, tmp_path: Path, boundary: str, start_as: str) -> None:
    daemon = _armed_daemon(tmp_path, boundary)
    server_id = ""
    try:
        with daemon.client() as client:
            images = {i["name"]: i["id"] for i in client.get("/image/v2/images").json()["images"]}
            old_image, new_image = images["demo-image-a"], images["demo-image-b"]
            server_id, volume_id = _create(client, old_image)
            name = f"rebuildd-test-{server_id}"
            if start_as == "stopped":
                client.post(f"/v2.1/servers/{server_id}/action", json={"os-stop": None})
                _until(client, server_id, "SHUTOFF")
            elif start_as == "error":
                _set_vm_state(tmp_path / "rebuildd.db", server_id, "error")
            old_disks = disk_sources(parse(qemu.lookupByName(name).XMLDesc(0)))
            old_disk = old_disks["vda"]
            # Killed before the 202 went out, the rebuild may or may not be recorded.
            with contextlib.suppress(httpx.TransportError):
                client.post(
                    f"/v2.1/servers/{server_id}/action", json={"rebuild": {"imageRef": new_image}}
                )
        assert daemon.wait_exit() == -9, "the kill hook did not fire"

        daemon.start()  # returns once /readyz says recovery is done
        server = daemon.get(f"/v2.1/servers/{server_id}")["server"]
        assert server["OS-EXT-STS:task_state"] is None
        rolled_back = server["image"]["id"] == old_image
        # Rolled back by recovery: a failed rebuild (the kill may also have come before the
        # rebuild was recorded, when nothing was tried).
        failed = rolled_back and _rebuild_recorded(daemon, server_id)
        expected = {"active": "ACTIVE", "stopped": "SHUTOFF", "error": "ACTIVE"}[start_as]
        if failed or (start_as == "error" and rolled_back):
            expected = "ERROR"
        assert server["status"] == expected, server
        if failed:
            assert "Interrupted" in server["fault"]["message"], server
            assert "rolled back" in server["fault"]["message"], server
        assert server["image"]["id"] in {old_image, new_image}

        dom = qemu.lookupByName(name)
        assert bool(dom.isActive()) == (start_as != "stopped"), "power state as before"
        root = disk_sources(parse(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)))["vda"]
        assert root.exists(), "never diskless"
        assert backing_file(root) == tmp_path / "_base" / server["image"]["id"]
        disks = disk_sources(parse(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)))
        assert list(disks) == list(old_disks), "every target still has its disk"
        assert all(path.exists() for path in disks.values()), "never a missing disk file"
        volume_file = tmp_path / "volumes" / f"volume-{volume_id}"
        (target,) = [t for t, p in old_disks.items() if p == volume_file]
        assert disks[target] == volume_file, "the volume on its target"
        local = {t: p for t, p in disks.items() if t != target}
        if rolled_back:
            assert root == old_disk, "rolled back onto the old disk"
            assert disks == old_disks, "rolled back onto every old disk"
        else:
            assert all(local[t] != old_disks[t] for t in local), "every local disk is new"
        files = sorted(p.name for p in (tmp_path / "instances" / server_id).iterdir())
        assert files == sorted(p.name for p in local.values()), f"orphaned disks: {files}"
        volume = daemon.get(f"/volume/v3/volumes/{volume_id}")["volume"]
        assert volume["status"] == "in-use", volume
        assert [a["server_id"] for a in volume["attachments"]] == [server_id], volume
        ours = [d.name() for d in qemu.listAllDomains(0) if server_id in d.name()]
        assert ours == [name]
        actions = daemon.get(f"/v2.1/servers/{server_id}/os-instance-actions")["instanceActions"]
        for action in actions:
            detail = daemon.get(
                f"/v2.1/servers/{server_id}/os-instance-actions/{action['request_id']}"
            )
            assert all(e["finish_time"] for e in detail["instanceAction"]["events"]), detail
    finally:
        _clean_up(qemu, daemon, server_id)


def _rebuild_recorded(daemon: DaemonProcess, server_id: str) -> bool:
    actions = daemon.get(f"/v2.1/servers/{server_id}/os-instance-actions")["instanceActions"]
    return any(a["action"] == "rebuild" for a in actions)


def _rebuild_failed(daemon: DaemonProcess, server_id: str) -> bool:
    """Whether the server's rebuild (if one was recorded before the kill) ended as a
    failure: one of its events is an Error."""
    actions = daemon.get(f"/v2.1/servers/{server_id}/os-instance-actions")["instanceActions"]
    for action in actions:
        if action["action"] != "rebuild":
            continue
        detail = daemon.get(f"/v2.1/servers/{server_id}/os-instance-actions/{action['request_id']}")
        if any(e["result"] == "Error" for e in detail["instanceAction"]["events"]):
            return True
    return False


def _until(client: httpx.Client, server_id: str, status: str) -> None:
    deadline = time.monotonic() + 60
    while client.get(f"/v2.1/servers/{server_id}").json()["server"]["status"] != status:
        assert time.monotonic() < deadline, f"never {status}"
        time.sleep(0.05)


def _clean_up(qemu: Any, daemon: DaemonProcess, server_id: str) -> None:
    if server_id and daemon.process is not None and daemon.process.poll() is None:
        httpx.delete(f"{daemon.url}/v2.1/servers/{server_id}", timeout=30)
        deadline = time.monotonic() + 30
        while httpx.get(f"{daemon.url}/v2.1/servers/{server_id}", timeout=30).status_code != 404:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
    daemon.stop()
    for dom in qemu.listAllDomains(0):
        if server_id and server_id in dom.name():
            if dom.isActive():
                dom.destroy()
            dom.undefine()


VOLUME_BACKED_BOUNDARIES = [
    "reserve_volumes:after",
    "detach_local_disks:after",
    "release_old_attachments:after",
    "reimage_root_volume:before",
    "reimage_root_volume:after",
    "block_device_mapping:after",
    "complete_volume_attachments:after",
    "start_domain:after",
]


@pytest.mark.qemu
@pytest.mark.parametrize("boundary", VOLUME_BACKED_BOUNDARIES)
def test_sigkill_of_a_volume_backed_rebuild(qemu: Any, tmp_path: Path, boundary: str) -> None:
    """A volume-backed server re-imaged at 2.93, killed at this boundary and restarted: it is
    ACTIVE (or ERROR when its rebuild was rolled back) and running on its root volume, which is
    in-use with exactly one attachment, never available."""
    daemon = _armed_daemon(tmp_path, boundary)
    server_id = ""
    try:
        with daemon.client() as client:
            images = {i["name"]: i["id"] for i in client.get("/image/v2/images").json()["images"]}
            flavor = {"flavor": {"name": "t1.bfv", "id": "bfv", "ram": 128, "vcpus": 1,
                                 "disk": 1}}  # fmt: skip
            client.post("/v2.1/flavors", json=flavor)
            root = {"source_type": "image", "destination_type": "volume", "boot_index": 0,
                    "uuid": images["demo-image-a"], "volume_size": 1}  # fmt: skip
            body = {"server": {"name": "bfv", "flavorRef": "bfv",
                               "block_device_mapping_v2": [root]}}  # fmt: skip
            response = client.post("/v2.1/servers", json=body)
            assert response.status_code == 202, response.text
            server_id = response.json()["server"]["id"]
            _until(client, server_id, "ACTIVE")
            (volume,) = client.get("/volume/v3/volumes/detail").json()["volumes"]
            with contextlib.suppress(httpx.TransportError):
                client.post(
                    f"/v2.1/servers/{server_id}/action",
                    json={"rebuild": {"imageRef": images["demo-image-b"]}},
                    headers={"OpenStack-API-Version": "compute 2.93"},
                )
        assert daemon.wait_exit() == -9, "the kill hook did not fire"

        daemon.start()
        server = daemon.get(f"/v2.1/servers/{server_id}")["server"]
        expected = "ERROR" if _rebuild_failed(daemon, server_id) else "ACTIVE"
        assert (server["status"], server["OS-EXT-STS:task_state"]) == (expected, None), server
        dom = qemu.lookupByName(f"rebuildd-test-{server_id}")
        assert dom.isActive()
        disks = disk_sources(parse(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)))
        assert disks["vda"] == tmp_path / "volumes" / f"volume-{volume['id']}"
        after = daemon.get(f"/volume/v3/volumes/{volume['id']}")["volume"]
        assert after["status"] == "in-use", after
        assert [a["server_id"] for a in after["attachments"]] == [server_id], after
    finally:
        _clean_up(qemu, daemon, server_id)
