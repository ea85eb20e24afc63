"""Hostile image bytes never reach qemu: crafted files (tests/hostile_images.py: a qcow2 whose
external data file or backing file is a host file, a VMDK extent at a host file, one format
declared as the other, a virtual size beyond the flavor's disk) are refused at every entry —
the inspection itself, the local image API, images already in the store that the cache fetches
(servers, rebuilds, volumes) — and an image's bytes cannot change once checked."""

from __future__ import annotations

import asyncio
import hashlib
import stat
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from rebuildd import errors, imagecheck
from rebuildd.disks import DiskManager
from rebuildd.images import LocalImageService
from rebuildd.models import Image, RequestContext, utcnow
from rebuildd.storage import Store
from tests import hostile_images as hostile
from tests.live import POLL_INTERVAL, LiveDaemon, start_live_daemon
from tests.test_adopt import _sub, run_adopt

Craft = Callable[[Path, Path], bytes]
CRAFTED: dict[str, Craft] = {
    "qcow2-data-file": hostile.qcow2_with_data_file,
    "qcow2-backing-file": hostile.qcow2_with_backing_file,
    "vmdk-host-extent": hostile.vmdk_with_host_extent,
}
# (crafted file, declared disk_format, what the refusal names)
REFUSALS = [
    ("qcow2-data-file", "qcow2", "data_file"),
    ("qcow2-data-file", "raw", "its content is qcow2"),
    ("qcow2-backing-file", "qcow2", "backing file"),
    ("qcow2-backing-file", "raw", "its content is qcow2"),
    ("vmdk-host-extent", "raw", "its content is vmdk"),
    ("vmdk-host-extent", "qcow2", "its content is vmdk"),
]


def _crafted(tmp_path: Path, name: str) -> bytes:
    return CRAFTED[name](tmp_path / f"{name}.img", hostile.marker(tmp_path))


def _message(response: Any) -> str:
    """The message of a Nova fault body (which must be one)."""
    ((_name, fault),) = response.json().items()
    assert fault["code"] == response.status_code, response.text
    return str(fault["message"])


class TestInspection:
    @pytest.mark.parametrize(("name", "declared", "reason"), REFUSALS)
    def test_crafted_files_are_refused_with_the_reason(
        self, tmp_path: Path, name: str, declared: str, reason: str
    ) -> None:
        """A file that points at a host file, or is not what it is declared, is refused."""
        path = tmp_path / f"{name}.img"
        CRAFTED[name](path, hostile.marker(tmp_path))
        with pytest.raises(errors.ImageDataInvalid, match=reason):
            imagecheck.inspect(path, declared)

    def test_raw_declared_qcow2_bytes_and_the_reverse_are_refused(self, tmp_path: Path) -> None:
        """Plain qcow2 bytes declared raw, and raw bytes declared qcow2, are both refused."""
        qcow2, raw = tmp_path / "a.qcow2", tmp_path / "a.raw"
        hostile.plain_qcow2(qcow2)
        raw.write_bytes(b"\1" * 65536)
        with pytest.raises(errors.ImageDataInvalid, match="its content is qcow2"):
            imagecheck.inspect(qcow2, "raw")
        with pytest.raises(errors.ImageDataInvalid, match="its content is raw"):
            imagecheck.inspect(raw, "qcow2")

    def test_formats_other_than_raw_and_qcow2_are_refused(self, tmp_path: Path) -> None:
        """A vmdk image, even a plain one, is not accepted: only raw and qcow2 reach qemu."""
        path = tmp_path / "plain.vmdk"
        hostile.plain_vmdk(path)
        with pytest.raises(errors.ImageDataInvalid, match="only qcow2, raw are accepted"):
            imagecheck.inspect(path, "vmdk")

    def test_plain_images_pass_with_their_virtual_size(self, tmp_path: Path) -> None:
        """A plain qcow2 and raw bytes with an MBR pass, with the size the guest sees."""
        qcow2, raw = tmp_path / "a.qcow2", tmp_path / "a.raw"
        hostile.plain_qcow2(qcow2, "3M")
        mbr = bytearray(1 << 20)
        mbr[446 + 4] = 0x83  # one Linux partition
        mbr[510:512] = b"\x55\xaa"
        raw.write_bytes(bytes(mbr))
        assert imagecheck.inspect(qcow2, "qcow2") == imagecheck.Inspected("qcow2", 3 << 20)
        assert imagecheck.inspect(raw, "raw") == imagecheck.Inspected("raw", 1 << 20)


class TestLocalImageApi:
    def test_crafted_uploads_are_400_with_the_reason_and_stay_queued(
        self, daemon: LiveDaemon, tmp_path: Path
    ) -> None:
        """Each crafted upload is a 400 naming the reason; the image stays queued, and the
        last one (declared qcow2) then takes a plain qcow2."""
        for name, declared, reason in REFUSALS:
            image = daemon.client.post(
                "/image/v2/images", json={"name": name, "disk_format": declared}
            ).json()
            response = daemon.client.put(
                f"/image/v2/images/{image['id']}/file",
                content=_crafted(tmp_path, name),
                headers={"Content-Type": "application/octet-stream"},
            )
            assert response.status_code == 400, (name, declared, response.text)
            assert reason in _message(response), (name, declared)
            assert str(tmp_path) not in _message(response)
            shown = daemon.client.get(f"/image/v2/images/{image['id']}").json()
            assert shown["status"] == "queued"
        plain = hostile.plain_qcow2(tmp_path / "plain.qcow2")
        response = daemon.client.put(
            f"/image/v2/images/{image['id']}/file",
            content=plain,
            headers={"Content-Type": "application/octet-stream"},
        )
        assert response.status_code == 204, response.text
        assert daemon.client.get(f"/image/v2/images/{image['id']}").json()["status"] == "active"

    def test_virtual_size_beyond_the_flavors_disk_is_400_at_create_and_rebuild(
        self, daemon: LiveDaemon, tmp_path: Path
    ) -> None:
        """A 2 GiB qcow2 on a 1 GiB flavor is Nova's FlavorDiskSmallerThanImage, a 400 before
        any job, at create and at rebuild."""
        image_id = _upload(daemon, hostile.plain_qcow2(tmp_path / "big.qcow2", "2G"), "qcow2")
        body = {"server": {"name": "big", "imageRef": image_id, "flavorRef": "1"}}
        response = daemon.client.post("/v2.1/servers", json=body)
        assert response.status_code == 400, response.text
        assert "Flavor's disk is too small for requested image" in _message(response)
        server_id = daemon.create_server()
        response = daemon.client.post(
            f"/v2.1/servers/{server_id}/action", json={"rebuild": {"imageRef": image_id}}
        )
        assert response.status_code == 400, response.text
        assert "Flavor's disk is too small for requested image" in _message(response)

    def test_the_cache_copy_shares_no_inode_with_the_store(self, daemon: LiveDaemon) -> None:
        """The base a server's disk backs onto is a copy of its own, not a link to the store's
        file that a later write could change under the guest."""
        server_id = daemon.create_server()
        daemon.wait_for(server_id, "ACTIVE")
        image_id = daemon.image_ids[0]
        state = daemon.settings.state_dir
        base, stored = state / "_base" / image_id, state / "images" / image_id
        assert base.read_bytes() == stored.read_bytes()
        assert base.stat().st_ino != stored.stat().st_ino
        assert base.stat().st_nlink == 1


def _upload(daemon: LiveDaemon, data: bytes, disk_format: str) -> str:
    image = daemon.client.post(
        "/image/v2/images", json={"name": "x", "disk_format": disk_format}
    ).json()
    response = daemon.client.put(
        f"/image/v2/images/{image['id']}/file",
        content=data,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 204, response.text
    return str(image["id"])


def _plant(daemon: LiveDaemon, data: bytes, disk_format: str) -> str:
    """An active image whose bytes were never inspected (stored by a rebuildd before this
    check): its record through the Store, its bytes in the store's directory."""
    image_id = str(uuid.uuid4())
    now = utcnow()
    image = Image(
        id=image_id, name="planted", status="active", disk_format=disk_format,
        container_format="bare", size=len(data), virtual_size=1 << 20, checksum=None,
        os_hash_algo="sha512", os_hash_value=hashlib.sha512(data).hexdigest(), min_disk=0,
        min_ram=0, visibility="public", protected=False, owner="demo", properties={},
        created_at=now, updated_at=now,
    )  # fmt: skip
    daemon.run(daemon.daemon.store.create_image(image))
    directory = daemon.settings.state_dir / "images"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / image_id).write_bytes(data)
    return image_id


def _fault(daemon: LiveDaemon, server_id: str) -> str:
    faults = daemon.run(daemon.daemon.store.latest_faults([server_id]))
    return str(faults[server_id].message)


class TestImagesAlreadyStored:
    @pytest.mark.parametrize(("name", "declared", "reason"), REFUSALS[:3])
    def test_a_server_from_an_unchecked_hostile_image_fails_naming_the_reason(
        self, daemon: LiveDaemon, tmp_path: Path, name: str, declared: str, reason: str
    ) -> None:
        """The cache inspects its copy before any qemu-img: the create ends in ERROR with a
        fault naming the image and the reason, and no base is left in the cache."""
        image_id = _plant(daemon, _crafted(tmp_path, name), declared)
        body = {"server": {"name": "vm", "imageRef": image_id, "flavorRef": "1"}}
        response = daemon.client.post("/v2.1/servers", json=body)
        assert response.status_code == 202, response.text
        server_id = response.json()["server"]["id"]
        daemon.wait_for(server_id, "ERROR")
        fault = _fault(daemon, server_id)
        assert f"Image {image_id} is unacceptable" in fault and reason in fault
        assert not (daemon.settings.state_dir / "_base" / image_id).exists()

    def test_a_rebuild_onto_an_unchecked_hostile_image_keeps_the_old_disk(
        self, daemon: LiveDaemon, tmp_path: Path
    ) -> None:
        """A rebuild onto a qcow2 with a host data file rolls back: ERROR (the guest running)
        on the old image and the old root disk, one Error event and a fault naming the reason."""
        image_id = _plant(daemon, _crafted(tmp_path, "qcow2-data-file"), "qcow2")
        server_id = daemon.create_server()
        before = daemon.wait_for(server_id, "ACTIVE")
        disks = sorted((daemon.settings.state_dir / "instances" / server_id).iterdir())
        response = daemon.client.post(
            f"/v2.1/servers/{server_id}/action", json={"rebuild": {"imageRef": image_id}}
        )
        assert response.status_code == 202, response.text
        request_id = response.headers["x-compute-request-id"]
        server = daemon.poll(
            server_id, lambda s: s["OS-EXT-STS:task_state"] is None, "settled", allow_error=True
        )
        assert server["status"] == "ERROR" and server["image"] == before["image"]
        assert server["OS-EXT-STS:power_state"] == 1
        assert sorted((daemon.settings.state_dir / "instances" / server_id).iterdir()) == disks
        assert "data_file" in _fault(daemon, server_id)
        detail = daemon.client.get(
            f"/v2.1/servers/{server_id}/os-instance-actions/{request_id}"
        ).json()
        failed = [e for e in detail["instanceAction"]["events"] if e["result"] == "Error"]
        assert len(failed) == 1
        for disk in disks:
            assert hostile.MARKER_BYTES[:32] not in hostile.readable_bytes(disk)

    def test_a_volume_from_an_unchecked_hostile_image_is_refused(
        self, daemon: LiveDaemon, tmp_path: Path
    ) -> None:
        """Volume-from-image inspects the cache's copy first: a 400 naming the reason, and no
        volume file holds a byte of the host file."""
        image_id = _plant(daemon, _crafted(tmp_path, "qcow2-data-file"), "qcow2")
        response = daemon.client.post(
            "/volume/v3/demo/volumes", json={"volume": {"size": 1, "imageRef": image_id}}
        )
        assert response.status_code == 400, response.text
        assert f"Image {image_id} is unacceptable" in _message(response)
        assert "data_file" in _message(response)
        for path in (daemon.settings.state_dir / "volumes").rglob("*"):
            if path.is_file():
                assert hostile.MARKER_BYTES[:32] not in path.read_bytes()

    def test_a_hostile_base_left_in_the_cache_is_checked_before_first_use(
        self, tmp_path: Path
    ) -> None:
        """A base already in _base when the daemon starts (fetched by an older rebuildd, or
        changed since) is checked again before a disk backs onto it: a hostile one is
        replaced by the image's real bytes, and the guest never reads the host file."""
        state = tmp_path / "state"
        live = start_live_daemon(state)
        image_id = live.image_ids[0]
        good = (state / "images" / image_id).read_bytes()
        live.stop()
        (state / "_base").mkdir(exist_ok=True)
        (state / "_base" / image_id).write_bytes(_crafted(tmp_path, "qcow2-data-file"))
        live = start_live_daemon(state)
        try:
            server_id = live.create_server()
            live.wait_for(server_id, "ACTIVE")
            assert (state / "_base" / image_id).read_bytes() == good
            (root,) = (state / "instances" / server_id).glob("root-*")
            assert hostile.MARKER_BYTES[:32] not in hostile.readable_bytes(root)
        finally:
            live.stop()


def _wait_volume_settled(daemon: LiveDaemon, volume_id: str) -> str:
    deadline = time.monotonic() + 30
    status = ""
    while time.monotonic() < deadline:
        status = daemon.client.get(f"/volume/v3/demo/volumes/{volume_id}").json()["volume"][
            "status"
        ]
        if status not in ("creating", "downloading"):
            return str(status)
        time.sleep(POLL_INTERVAL)
    raise AssertionError(f"volume still {status}")


class TestDisks:
    def test_a_root_disk_smaller_than_its_image_is_refused(self, tmp_path: Path) -> None:
        """An overlay smaller than its base's virtual size (a size only known once fetched) is
        Nova's FlavorDiskSmallerThanImage, and no disk is made."""
        base = tmp_path / "base.qcow2"
        hostile.plain_qcow2(base, "2G")
        disks = DiskManager(tmp_path / "instances")
        root = tmp_path / "server" / "root.qcow2"
        with pytest.raises(errors.FlavorDiskSmallerThanImage):
            asyncio.run(
                disks.create_overlay(base=base, base_format="qcow2", path=root, size_bytes=1 << 30)
            )
        assert not root.exists()

    def test_every_qemu_img_call_names_the_format_and_runs_under_limits(
        self, tmp_path: Path
    ) -> None:
        """Upload, server create, rebuild and volume-from-image: each qemu-img call that reads
        an image has -f, and runs with Nova's 1 GiB address space (30 s CPU but convert)."""
        log = tmp_path / "calls.log"
        wrapper = tmp_path / "qemu-img"
        wrapper.write_text(
            "#!/bin/sh\n"
            f'echo "as=$(ulimit -v) cpu=$(ulimit -t) $*" >> "{log}"\n'
            'exec qemu-img "$@"\n'
        )
        wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
        live = start_live_daemon(tmp_path / "state", qemu_img=str(wrapper))
        try:
            server_id = live.create_server()
            live.wait_for(server_id, "ACTIVE")
            response = live.client.post(
                f"/v2.1/servers/{server_id}/action",
                json={"rebuild": {"imageRef": live.image_ids[1]}},
            )
            assert response.status_code == 202
            live.poll(server_id, lambda s: s["OS-EXT-STS:task_state"] is None, "rebuilt")
            response = live.client.post(
                "/volume/v3/demo/volumes",
                json={"volume": {"size": 1, "imageRef": live.image_ids[0]}},
            )
            assert _wait_volume_settled(live, response.json()["volume"]["id"]) == "available"
        finally:
            live.stop()
        calls = log.read_text().splitlines()
        verbs = {line.split()[2] for line in calls}
        assert {"info", "create", "convert"} <= verbs, calls
        for line in calls:
            limits, args = line.split()[:2], line.split()[2:]
            if args[0] == "create" and "-b" not in args:
                continue  # the demo seed making its images: a new file, no image read
            assert limits[0] == f"as={1 << 20}", line  # KiB
            assert limits[1] == ("cpu=unlimited" if args[0] == "convert" else "cpu=30"), line
            assert "-f" in args, line


class TestUploadRace:
    async def test_racing_uploads_into_one_queued_image_one_wins(
        self, store: Store, tmp_path: Path
    ) -> None:
        """Of ten uploads into one queued image at once, one activates it; the others are
        409 and its bytes are the winner's."""
        images = LocalImageService(store, tmp_path / "images", DiskManager(tmp_path / "inst"))
        context = RequestContext(request_id="req-race", user_id="u", project_id="demo")
        image = await images.create(context, {"name": "race", "disk_format": "raw"})
        payloads = [bytes([n + 1]) * (1 << 20) for n in range(10)]

        async def chunks(data: bytes) -> AsyncIterator[bytes]:
            for offset in range(0, len(data), 1 << 16):
                await asyncio.sleep(0)
                yield data[offset : offset + (1 << 16)]

        results = await asyncio.gather(
            *(images.upload(image.id, chunks(p)) for p in payloads), return_exceptions=True
        )
        won = [r for r in results if isinstance(r, Image)]
        lost = [r for r in results if not isinstance(r, Image)]
        assert len(won) == 1 and all(isinstance(r, errors.Conflict) for r in lost), results
        stored = (tmp_path / "images" / image.id).read_bytes()
        assert hashlib.sha512(stored).hexdigest() == won[0].os_hash_value
        assert stored in payloads
        assert [p.name for p in (tmp_path / "images").iterdir()] == [image.id]


def _node(tmp_path: Path, disks: dict[str, tuple[Path, str]]) -> str:
    """A libvirt test-driver host with one domain per (root file, driver type)."""
    node = etree.Element("node")
    for name, (path, fmt) in disks.items():
        domain = _sub(node, "domain", type="test")
        _sub(domain, "name", name)
        _sub(domain, "uuid", str(uuid.uuid4()))
        _sub(domain, "memory", "131072")
        _sub(domain, "vcpu", "1")
        _sub(_sub(domain, "os"), "type", "hvm")
        disk = _sub(_sub(domain, "devices"), "disk", type="file", device="disk")
        _sub(disk, "driver", name="qemu", type=fmt)
        _sub(disk, "source", file=str(path))
        _sub(disk, "target", dev="vda", bus="virtio")
    xml = tmp_path / "node.xml"
    xml.write_bytes(etree.tostring(node))
    return f"test://{xml}"


class TestAdopt:
    def test_a_domain_whose_disk_or_base_points_at_a_host_file_is_not_adopted(
        self, tmp_path: Path
    ) -> None:
        """adopt inspects the root disk as its <driver type> and the base it backs onto before
        qemu-img reads either: a data file, a base with one, or qcow2 bytes the XML calls raw
        refuse the domain, naming why; a plain overlay on a raw base is adopted."""
        target = hostile.marker(tmp_path)
        data_file, bad_base, good_base = (tmp_path / n for n in ("df.qcow2", "base", "raw.base"))
        hostile.qcow2_with_data_file(data_file, target)
        hostile.qcow2_with_data_file(bad_base, target)
        good_base.write_bytes(b"\0" * (1 << 20))
        overlays = {}
        for base, fmt in ((bad_base, "qcow2"), (good_base, "raw")):
            overlay = tmp_path / f"over-{base.name}.qcow2"
            hostile.qcow2_overlay(overlay, base, fmt)
            overlays[base] = overlay
        cases = {
            "adopt-data-file": ((data_file, "qcow2"), "data_file"),
            "adopt-base-data-file": ((overlays[bad_base], "qcow2"), "data_file"),
            "adopt-qcow2-as-raw": ((data_file, "raw"), "its content is qcow2"),
        }
        disks = {name: disk for name, (disk, _) in cases.items()}
        disks["adopt-good"] = (overlays[good_base], "qcow2")
        uri = _node(tmp_path, disks)
        state = tmp_path / "state"
        for name, (_disk, reason) in cases.items():
            refused = run_adopt(state, name, uri=uri)
            assert refused.returncode == 1, refused.stdout
            assert "its root disk cannot be read" in refused.stderr and reason in refused.stderr
        adopted = run_adopt(state, "adopt-good", uri=uri)
        assert adopted.returncode == 0, adopted.stderr
        assert target.read_bytes() == hostile.MARKER_BYTES
