"""A full file system under the instances directory, and disk errors in general: what a user
reads (a server's fault, an API error) names no host path, and a failed disk leaves nothing
half-made."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from rebuildd import errors
from rebuildd.configdrive import ConfigDriveData
from rebuildd.disks import DiskManager, DiskSpaceExhausted
from rebuildd.errors import DiskError, HypervisorError, without_host_paths
from tests.live import LiveDaemon, start_live_daemon
from tests.test_database_faults import _fill, settled, small_tmpfs


def _fault(live: LiveDaemon, server_id: str) -> str:
    faults = live.run(live.daemon.store.latest_faults([server_id]))
    message: str = faults[server_id].message
    return message


def _disks(live: LiveDaemon, server_id: str) -> set[str]:
    in_use: set[str] = live.run(live.daemon.store.paths_in_use())
    return {p for p in in_use if f"/{server_id}/" in p}


def test_a_full_instances_dir_fails_rebuild_and_create_without_a_host_path(
    tmp_path: Path,
) -> None:
    """With the instances directory's file system full, a rebuild rolls back to its old disk
    and a create ends in ERROR, each fault naming no path under the state dir, and no disk
    file is left half-made."""
    state = tmp_path / "state"
    with small_tmpfs(state / "instances", "16m") as instances:
        live = start_live_daemon(state)
        try:
            server_id = live.create_server("old")
            old_disks = _disks(live, server_id)
            assert old_disks
            _fill(instances / "filler")
            response = live.client.post(
                f"/v2.1/servers/{server_id}/action",
                json={"rebuild": {"imageRef": live.image_ids[1]}},
            )
            assert response.status_code == 202, response.text
            live.wait_for(server_id, "ERROR")  # rolled back: REBUILDD_FAILED_REBUILD_STATE
            assert live.server(server_id)["image"]["id"] == live.image_ids[0]
            assert _disks(live, server_id) == old_disks
            assert all(Path(p).exists() for p in old_disks)
            fault = _fault(live, server_id)
            assert "space" in fault.lower(), fault
            assert str(state) not in fault and "/instances" not in fault, fault
            settled(live)

            body = {"server": {"name": "new", "imageRef": live.image_ids[1], "flavorRef": "1"}}
            response = live.client.post("/v2.1/servers", json=body)
            assert response.status_code == 202, response.text
            new_id = response.json()["server"]["id"]
            shown = live.wait_for(new_id, "ERROR")
            message = shown["fault"]["message"]
            assert "space" in message.lower(), message
            assert str(state) not in message and "/instances" not in message, message
            assert not (instances / new_id).exists() or not any((instances / new_id).iterdir())
        finally:
            live.stop()


def test_a_qemu_img_failure_names_no_host_path(tmp_path: Path) -> None:
    """qemu-img's own message about a file it cannot open keeps only the file's last name."""
    disks = DiskManager(tmp_path / "instances")
    missing = tmp_path / "instances" / "nothing-here.qcow2"
    try:
        asyncio.run(disks.info(missing, fmt="qcow2"))
    except DiskError as exc:
        assert "nothing-here.qcow2" in exc.message
        assert str(tmp_path) not in exc.message, exc.message
    else:
        raise AssertionError("qemu-img info of a missing file succeeded")
    finally:
        disks.close()


class _PathNamingHypervisor:
    """libvirt's adapter whose first ``power_off`` fails with ``error`` (a fake of a failure
    whose words name a host path, as libvirt's and the OS's do)."""

    def __init__(self, real: Any, error: BaseException) -> None:
        self.real, self.error, self.failed = real, error, False

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.real, name)
        if name != "power_off":
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            if not self.failed:
                self.failed = True
                raise self.error
            return await attr(*args, **kwargs)

        return call


@pytest.mark.parametrize("kind", ["libvirt", "os"])
def test_a_failure_naming_a_host_path_leaves_it_out_of_the_fault(tmp_path: Path, kind: str) -> None:
    """A rebuild fails with libvirt's words naming a disk's host path, or with an OS error
    of a file: the server's fault keeps the file's last name at most, never the path."""
    secret = tmp_path / "instances" / "0f0f" / "root-abc.qcow2"
    error: BaseException = (
        HypervisorError(call="power_off", reason=f"Cannot access storage file '{secret}'")
        if kind == "libvirt"
        else PermissionError(13, "Permission denied", str(secret))
    )
    live = start_live_daemon(tmp_path, hypervisor_port=lambda r: _PathNamingHypervisor(r, error))
    try:
        server_id = live.create_server()
        response = live.client.post(
            f"/v2.1/servers/{server_id}/action",
            json={"rebuild": {"imageRef": live.image_ids[1]}},
        )
        assert response.status_code == 202, response.text
        settled(live)
        fault = _fault(live, server_id)
        assert str(tmp_path) not in fault and "/instances/" not in fault, fault
    finally:
        live.stop()


def test_without_host_paths_keeps_urls_and_short_device_paths() -> None:
    """Host paths are cut to their last component; a URL and ``/dev/vdb`` are left whole."""
    message = "open '/var/lib/rebuildd/_base/abc': see http://glance:9292/v2/images/x on /dev/vdb"
    assert without_host_paths(message) == (
        "open 'abc': see http://glance:9292/v2/images/x on /dev/vdb"
    )


def test_only_host_words_lose_their_paths() -> None:
    """libvirt's words lose their host paths; an upstream service's URL path is kept."""
    libvirt = HypervisorError(call="start", reason="Cannot access '/var/lib/rebuildd/a/b'")
    glance = errors.ImageFetchError(image_id="x", reason="HTTP 404 from /v2/images/x/file")
    assert errors.user_message(libvirt) == "libvirt start failed: Cannot access 'b'"
    assert errors.user_message(glance) == glance.message


class TestFullFileSystem:
    """Each kind of disk made on a full file system: a DiskSpaceExhausted naming the disk,
    never its path, and no file left behind."""

    def test_blank_bases_overlays_and_config_drives(self, tmp_path: Path) -> None:
        """An ephemeral base, a swap base and a config drive each fail as DiskSpaceExhausted
        with no path in the message, and leave no file."""
        with small_tmpfs(tmp_path / "fs", "4m") as fs:
            disks = DiskManager(fs / "instances", base_dir=fs / "_base")
            server = "0f0f0f0f-0000-4000-8000-000000000001"
            (fs / "instances").mkdir()
            (fs / "_base").mkdir()
            _fill(fs / "filler")
            data = ConfigDriveData(
                server_id=server, name="s", hostname="s", project_id="p", image_id=None,
                flavor_name="m1.tiny", user_data="aGVsbG8=",
            )  # fmt: skip
            attempts = [
                disks.create_blank(
                    path=disks.new_disk_path(server, "ephemeral0"), size_mib=8, guest_format="ext4"
                ),
                disks.create_blank(
                    path=disks.new_disk_path(server, "swap"), size_mib=8, guest_format="swap"
                ),
                disks.create_config_drive(disks.new_disk_path(server, "config"), data),
            ]
            try:
                for attempt in attempts:
                    with pytest.raises(DiskSpaceExhausted) as refused:
                        asyncio.run(attempt)
                    assert str(fs) not in refused.value.message, refused.value.message
                    assert errors.http_fault(refused.value)[0] == 413
            finally:
                disks.close()
            left = [p for p in fs.rglob("*") if p.is_file() and p.name != "filler"]
            assert left == []


def test_an_image_upload_onto_a_full_disk_is_413_and_stays_queued(tmp_path: Path) -> None:
    """An image upload whose bytes do not fit on the image store's file system is Glance's
    413 naming no path, and the image stays ``queued`` with no file left."""
    state = tmp_path / "state"
    with small_tmpfs(state / "images", "16m") as images:
        live = start_live_daemon(state)
        try:
            created = live.client.post(
                "/image/v2/images",
                json={"name": "big", "disk_format": "raw", "container_format": "bare"},
            )
            image_id = created.json()["id"]
            _fill(images / "filler")
            response = live.client.put(
                f"/image/v2/images/{image_id}/file",
                content=b"\0" * (1 << 20),
                headers={"Content-Type": "application/octet-stream"},
            )
            assert response.status_code == 413, response.text
            assert str(state) not in response.text, response.text
            image = live.client.get(f"/image/v2/images/{image_id}").json()
            assert image["status"] == "queued"
            assert not list(images.glob(f"*{image_id}*"))
        finally:
            live.stop()


def test_a_volume_from_an_image_onto_a_full_disk_is_413_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    """A volume made from an image whose bytes do not fit on the volume store's file system
    is Cinder's 413 naming no path, and no volume or file is left of it."""
    state = tmp_path / "state"
    with small_tmpfs(state / "volumes", "8m") as volumes:
        live = start_live_daemon(state)
        try:
            _fill(volumes / "filler")
            response = live.client.post(
                "/volume/v3/demo/volumes",
                json={"volume": {"size": 1, "imageRef": live.image_ids[0]}},
            )
            assert response.status_code == 413, response.text
            assert str(state) not in response.text, response.text
            assert live.client.get("/volume/v3/demo/volumes").json()["volumes"] == []
            assert [p.name for p in volumes.iterdir()] == ["filler"]
        finally:
            live.stop()
