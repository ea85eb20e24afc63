"""Real guests on libvirtd + QEMU (started by ``make test``): a server with root, ephemeral and
swap disks and a config drive is rebuilt the way Nova's libvirt driver rebuilds one — and, where
Nova refuses, with ``preserve_ephemeral`` — and every disk file is checked on the host."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from lxml import etree

from rebuildd.configdrive import read_iso
from tests.conftest import require
from tests.live import LiveDaemon, start_live_daemon
from tests.xmlutil import backing_file, disk_sources, outside_disks

libvirt = pytest.importorskip("libvirt")
URI = "qemu:///system"
V290 = {"OpenStack-API-Version": "compute 2.90"}
KEY_A = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGfirstkeyfirstkeyfirstkeyfirstkeyfirstkeyAA a@h"
KEY_B = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHsecondkeysecondkeysecondkeysecondkeysecond b@h"


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture
def guests(tmp_path: Path) -> Iterator[LiveDaemon]:
    try:
        libvirt.open(URI).close()
    except libvirt.libvirtError as exc:
        require("libvirtd with the QEMU driver", str(exc))
    live = start_live_daemon(
        tmp_path,
        libvirt_uri=URI,
        domain_type="qemu",  # TCG: an OS-less guest idles
        domain_name_prefix="rebuildd-test-",
        shutdown_timeout=1.0,  # an OS-less guest ignores ACPI; it is destroyed after this
    )
    flavor = {
        "flavor": {"name": "t1.full", "id": "full", "ram": 128, "vcpus": 1, "disk": 1,
                   "OS-FLV-EXT-DATA:ephemeral": 1, "swap": 64}
    }  # fmt: skip
    assert live.client.post("/v2.1/flavors", json=flavor).status_code == 200
    for name, key in (("key-a", KEY_A), ("key-b", KEY_B)):
        body = {"keypair": {"name": name, "public_key": key}}
        assert live.client.post("/v2.1/os-keypairs", json=body).status_code in (200, 201)
    try:
        yield live
    finally:
        _delete_all(live)
        live.stop()


def _delete_all(live: LiveDaemon) -> None:
    """Delete every server and wait until each is gone (its domain undefined)."""
    servers = live.client.get("/v2.1/servers").json()["servers"]
    for server in servers:
        live.client.delete(f"/v2.1/servers/{server['id']}")
    deadline = time.monotonic() + 60
    while live.client.get("/v2.1/servers").json()["servers"] and time.monotonic() < deadline:
        time.sleep(0.05)


def _create(live: LiveDaemon, **extra: Any) -> str:
    body = {
        "server": {
            "name": "guest",
            "imageRef": live.image_ids[0],
            "flavorRef": "full",
            "config_drive": True,
            "key_name": "key-a",
            "user_data": _b64("#cloud-config\nfirst: boot\n"),
            "metadata": {"role": "web"},
            **extra,
        }
    }
    response = live.client.post("/v2.1/servers", json=body)
    assert response.status_code == 202, response.text
    server_id: str = response.json()["server"]["id"]
    live.wait_for(server_id, "ACTIVE")
    return server_id


def _domain_xml(server_id: str) -> etree._Element:
    conn = libvirt.open(URI)
    try:
        xml = conn.lookupByName(f"rebuildd-test-{server_id}").XMLDesc(
            libvirt.VIR_DOMAIN_XML_INACTIVE
        )
    finally:
        conn.close()
    return etree.fromstring(xml.encode())


def _active(server_id: str) -> bool:
    conn = libvirt.open(URI)
    try:
        return bool(conn.lookupByName(f"rebuildd-test-{server_id}").isActive())
    finally:
        conn.close()


def _rebuild(live: LiveDaemon, server_id: str, body: dict[str, Any]) -> dict[str, Any]:
    response = live.client.post(
        f"/v2.1/servers/{server_id}/action", json={"rebuild": body}, headers=V290
    )
    assert response.status_code == 202, response.text
    return dict(response.json()["server"])


def _meta_data(iso: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    files = read_iso(iso)
    return json.loads(files["openstack/latest/meta_data.json"]), files


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.qemu
def test_rebuild_recreates_every_local_disk_and_regenerates_the_config_drive(
    guests: LiveDaemon,
) -> None:
    """Rebuilt onto another image with a new name, key, password, user data and hostname: the
    root overlay backs onto the new base, ephemeral and swap are new files on their bases, the
    config drive shows the new values, targets keep their order, and nothing else changes."""
    live = guests
    server_id = _create(live)
    before = _domain_xml(server_id)
    old = disk_sources(before)
    assert list(old) == ["vda", "vdb", "vdc", "hdd"]
    cdrom = before.find("devices/disk[@device='cdrom']")
    assert cdrom is not None and cdrom.find("target").get("bus") == "ide"  # type: ignore[union-attr]
    meta, files = _meta_data(old["hdd"])
    assert (meta["uuid"], meta["name"], meta["public_keys"]) == (
        server_id, "guest", {"key-a": KEY_A}
    )  # fmt: skip
    assert "admin_pass" in meta  # the generated one, as Nova gives it to the config drive
    assert files["openstack/latest/user_data"] == b"#cloud-config\nfirst: boot\n"
    mac = before.find("devices/interface/mac").get("address")  # type: ignore[union-attr]
    network = json.loads(files["openstack/latest/network_data.json"])
    assert [link["ethernet_mac_address"] for link in network["links"]] == [mac]

    _rebuild(
        live,
        server_id,
        {
            "imageRef": live.image_ids[1],
            "name": "rebuilt",
            "adminPass": "n3w-Passw0rd",
            "key_name": "key-b",
            "user_data": _b64("#cloud-config\nsecond: boot\n"),
            "hostname": "web-2",
            "metadata": {"role": "db"},
        },
    )
    server = live.wait_for(server_id, "ACTIVE")
    assert server["image"]["id"] == live.image_ids[1]
    assert _active(server_id)

    after = _domain_xml(server_id)
    new = disk_sources(after)
    assert list(new) == list(old), "same targets, same order"
    base = live.settings.state_dir / "_base"
    assert backing_file(new["vda"]) == base / live.image_ids[1]
    assert backing_file(new["vdb"]) == base / "ephemeral_1024_ext4"
    assert backing_file(new["vdc"]) == base / "swap_64"
    for target in old:
        assert new[target] != old[target] and new[target].exists(), target
        assert not old[target].exists(), f"the old {target} is removed after the start"
    blkid = subprocess.run(
        ["blkid", "-o", "export", str(base / "ephemeral_1024_ext4")],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "TYPE=ext4" in blkid and "LABEL=ephemeral0" in blkid
    swap = subprocess.run(
        ["blkid", "-o", "value", "-s", "TYPE", str(base / "swap_64")],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert swap.strip() == "swap"

    meta, files = _meta_data(new["hdd"])
    assert meta["name"] == "rebuilt"
    assert meta["hostname"].split(".")[0] == "web-2"
    assert meta["public_keys"] == {"key-b": KEY_B}
    assert meta["admin_pass"] == "n3w-Passw0rd"
    assert meta["meta"] == {"role": "db"}
    assert files["openstack/latest/user_data"] == b"#cloud-config\nsecond: boot\n"

    # The domain describes itself in Nova's terms: the new name and the new root image.
    nova = "{http://openstack.org/xmlns/libvirt/nova/1.1}"
    assert after.findtext(f"metadata/{nova}instance/{nova}name") == "rebuilt"
    root_image = after.find(f"metadata/{nova}instance/{nova}root")
    assert root_image is not None and root_image.get("uuid") == live.image_ids[1]

    # Outside the owned <disk> elements and the metadata, the definition is what it was.
    assert outside_disks(after) == outside_disks(before)


@pytest.mark.qemu
def test_preserve_ephemeral_keeps_the_same_file_with_the_same_content(guests: LiveDaemon) -> None:
    """A stopped server rebuilt with preserve_ephemeral keeps its ephemeral disk file, bytes and
    all (Nova's libvirt driver refuses this), gets a new root and swap, and ends stopped."""
    live = guests
    server_id = _create(live)
    live.client.post(f"/v2.1/servers/{server_id}/action", json={"os-stop": None})
    live.wait_for(server_id, "SHUTOFF")
    old = disk_sources(_domain_xml(server_id))
    ephemeral = old["vdb"]
    subprocess.run(
        ["qemu-io", "-c", "write -P 0xab 1M 64k", str(ephemeral)], check=True, capture_output=True
    )
    inode, digest = ephemeral.stat().st_ino, _sha256(ephemeral)

    _rebuild(live, server_id, {"imageRef": live.image_ids[1], "preserve_ephemeral": True})
    live.wait_for(server_id, "SHUTOFF")
    assert not _active(server_id), "a stopped server ends stopped"

    new = disk_sources(_domain_xml(server_id))
    assert new["vdb"] == ephemeral and ephemeral.stat().st_ino == inode
    assert _sha256(ephemeral) == digest
    subprocess.run(
        ["qemu-io", "-c", "read -P 0xab 1M 64k", str(ephemeral)], check=True, capture_output=True
    )
    assert new["vda"] != old["vda"] and new["vdc"] != old["vdc"] and new["hdd"] != old["hdd"]


def _image_with(live: LiveDaemon, **properties: str) -> str:
    """A copy of demo image B with extra properties, through the Glance-compatible API."""
    source = live.client.get(f"/image/v2/images/{live.image_ids[1]}").json()
    body = {"name": "with-props", "disk_format": source["disk_format"],
            "container_format": "bare", **properties}  # fmt: skip
    created = live.client.post("/image/v2/images", json=body)
    assert created.status_code == 201, created.text
    image_id: str = created.json()["id"]
    data = (live.settings.state_dir / "images" / live.image_ids[1]).read_bytes()
    uploaded = live.client.put(
        f"/image/v2/images/{image_id}/file",
        content=data,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert uploaded.status_code == 204, uploaded.text
    return image_id


@pytest.mark.qemu
def test_a_guest_that_ignores_acpi_is_destroyed_after_the_images_shutdown_timeout(
    tmp_path: Path,
) -> None:
    """The old image's os_shutdown_timeout (1 s) wins over the setting (45 s): the OS-less
    guest ignores the ACPI request, is destroyed after the timeout, and the rebuild goes on."""
    try:
        libvirt.open(URI).close()
    except libvirt.libvirtError as exc:
        require("libvirtd with the QEMU driver", str(exc))
    live = start_live_daemon(
        tmp_path, libvirt_uri=URI, domain_type="qemu", domain_name_prefix="rebuildd-test-",
        shutdown_timeout=45.0,
    )  # fmt: skip
    try:
        image = _image_with(live, os_shutdown_timeout="1")
        flavor = {"flavor": {"name": "t1.acpi", "id": "acpi", "ram": 128, "vcpus": 1, "disk": 1}}
        assert live.client.post("/v2.1/flavors", json=flavor).status_code == 200
        body = {"server": {"name": "deaf", "imageRef": image, "flavorRef": "acpi"}}
        server_id = live.client.post("/v2.1/servers", json=body).json()["server"]["id"]
        live.wait_for(server_id, "ACTIVE")
        started = time.monotonic()
        with structlog.testing.capture_logs() as logs:
            live.client.post(
                f"/v2.1/servers/{server_id}/action",
                json={"rebuild": {"imageRef": live.image_ids[0]}},
            )
            live.wait_for(server_id, "ACTIVE")
        assert time.monotonic() - started < 45, "the setting's 45 s were waited, not the image's"
        destroyed = [e for e in logs if e["event"] == "guest did not shut down in time; destroyed"]
        assert destroyed, "destroyed, not shut down"
        assert destroyed[0]["server_id"] == server_id and destroyed[0]["timeout"] == 1.0
        assert _active(server_id)
    finally:
        _delete_all(live)
        live.stop()


@pytest.mark.qemu
def test_a_corrupt_base_image_fails_the_rebuild_with_every_old_disk_attached(
    guests: LiveDaemon,
) -> None:
    """Image bytes that do not match the image's checksum: the rebuild fails with a fault, the
    old root, ephemeral, swap and config drive are still attached and intact, the guest runs."""
    live = guests
    server_id = _create(live)
    old = disk_sources(_domain_xml(server_id))
    digests = {target: _sha256(path) for target, path in old.items() if target != "vda"}
    stored = live.settings.state_dir / "images" / live.image_ids[1]
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))

    response = live.client.post(
        f"/v2.1/servers/{server_id}/action", json={"rebuild": {"imageRef": live.image_ids[1]}}
    )
    request_id = response.headers["x-compute-request-id"]
    server = live.poll(
        server_id, lambda s: s["OS-EXT-STS:task_state"] is None, "settled", allow_error=True
    )
    # ERROR (REBUILDD_FAILED_REBUILD_STATE's default), on its old image, disks and power state.
    assert server["status"] == "ERROR" and server["image"]["id"] == live.image_ids[0]
    assert disk_sources(_domain_xml(server_id)) == old
    assert all(path.exists() for path in old.values())
    assert backing_file(old["vda"]) == live.settings.state_dir / "_base" / live.image_ids[0]
    assert {t: _sha256(p) for t, p in old.items() if t != "vda"} == digests
    assert sorted(p.name for p in old["vda"].parent.iterdir()) == sorted(
        p.name for p in old.values()
    ), "the new disks were removed"
    assert _active(server_id)
    fault = live.run(live.daemon.store.latest_faults([server_id]))[server_id]
    # The checksum mismatch, named (the message is cut to fit the rollback note; the details
    # keep it whole).
    assert "sha512 of the data is" in fault.message and "rolled back" in fault.message
    assert "expected" in fault.details
    detail = live.client.get(f"/v2.1/servers/{server_id}/os-instance-actions/{request_id}")
    events = detail.json()["instanceAction"]["events"]
    assert [e["result"] for e in events if e["result"] == "Error"] == ["Error"]


def _raw_image(live: LiveDaemon, tmp_path: Path) -> str:
    """A 16 MiB raw image with a pattern in its first MiB, through the Glance-compatible API."""
    path = tmp_path / "raw.img"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(path), "16M"], check=True)
    subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 0xcd 0 1M", str(path)],
        check=True, capture_output=True,
    )  # fmt: skip
    body = {"name": "raw", "disk_format": "raw", "container_format": "bare"}
    image_id: str = live.client.post("/image/v2/images", json=body).json()["id"]
    uploaded = live.client.put(
        f"/image/v2/images/{image_id}/file",
        content=path.read_bytes(),
        headers={"Content-Type": "application/octet-stream"},
    )
    assert uploaded.status_code == 204, uploaded.text
    return image_id


@pytest.mark.qemu
def test_raw_and_qcow2_images_both_back_root_overlays(guests: LiveDaemon, tmp_path: Path) -> None:
    """A server of a raw image runs on a qcow2 overlay of the raw base, sized to the flavor's
    root disk and showing the image's bytes; rebuilt onto a qcow2 image, its new overlay backs
    onto that image's qcow2 base."""
    live = guests
    raw = _raw_image(live, tmp_path)
    server_id = _create(live, imageRef=raw)
    root = disk_sources(_domain_xml(server_id))["vda"]
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", str(root)],
            check=True, capture_output=True, text=True,
        ).stdout
    )  # fmt: skip
    assert (info["format"], info["backing-filename-format"]) == ("qcow2", "raw")
    assert info["virtual-size"] == 1024**3  # the flavor's root disk, larger than the image
    assert Path(info["full-backing-filename"]) == live.settings.state_dir / "_base" / raw
    subprocess.run(
        ["qemu-io", "-U", "-r", "-c", "read -P 0xcd 0 1M", str(root)],
        check=True, capture_output=True,
    )  # fmt: skip

    _rebuild(live, server_id, {"imageRef": live.image_ids[1]})
    live.wait_for(server_id, "ACTIVE")
    new_root = disk_sources(_domain_xml(server_id))["vda"]
    assert backing_file(new_root) == live.settings.state_dir / "_base" / live.image_ids[1]
