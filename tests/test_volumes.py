"""Local volumes with Cinder's semantics, on SQLite and PostgreSQL after real migrations, with
real files and real qemu-img: the attachment state machine, its refusals and races, create,
delete and re-image."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import pytest

from rebuildd import errors
from rebuildd.disks import DiskManager
from rebuildd.models import Image, RequestContext, Volume
from rebuildd.storage import Store
from rebuildd.volumes import GiB, LocalVolumeService
from rebuildd.volumestore import VolumeStore

CONTEXT = RequestContext("req-test", "alice", "demo", ("member",))
CONNECTOR = {"host": "hv1", "ip": "127.0.0.1", "initiator": None, "os_type": "linux"}
SERVER_A = "11111111-1111-4111-8111-111111111111"
SERVER_B = "22222222-2222-4222-8222-222222222222"
PATTERN = b"rebuildd-volume-bytes" * 100


class FakeCache:
    """The image cache port: every image's base is one prepared raw file."""

    def __init__(self, base: Path) -> None:
        self.base = base

    async def ensure(self, image: Image) -> Path:
        return self.base


def _image(size: int, *, image_id: str = "33333333-3333-4333-8333-333333333333") -> Image:
    now = dt.datetime.now(dt.UTC)
    return Image(
        id=image_id,
        name="img",
        status="active",
        disk_format="raw",
        container_format="bare",
        size=size,
        virtual_size=size,
        checksum="c0ffee",
        os_hash_algo=None,
        os_hash_value=None,
        min_disk=0,
        min_ram=64,
        visibility="public",
        protected=False,
        owner=None,
        properties={},
        created_at=now,
        updated_at=now,
    )


@pytest.fixture
def service(store: Store, tmp_path: Path) -> LocalVolumeService:
    base = tmp_path / "base.raw"
    base.write_bytes(PATTERN)
    disks = DiskManager(tmp_path / "instances", base_dir=tmp_path / "_base")
    return LocalVolumeService(VolumeStore(store), tmp_path / "volumes", disks, FakeCache(base))


async def _status(service: LocalVolumeService, volume_id: str) -> str:
    volume = await service.get(volume_id)
    assert volume is not None
    return volume.status


async def _volume(service: LocalVolumeService, **kw: object) -> Volume:
    return await service.create(CONTEXT, size=1, name="v", **kw)  # type: ignore[arg-type]


class TestAttachments:
    async def test_create_update_complete_walks_reserved_attaching_in_use(
        self, service: LocalVolumeService
    ) -> None:
        """available -> reserved -> attaching (with connection_info) -> in-use, attachment too."""
        volume = await _volume(service)
        assert volume.status == "available"
        attachment = await service.attachment_create(volume.id, SERVER_A)
        assert (attachment.status, await _status(service, volume.id)) == ("reserved", "reserved")
        updated = await service.attachment_update(attachment.id, CONNECTOR, mountpoint="/dev/vdb")
        assert updated.status == "attaching"
        assert updated.connection_info == {
            "driver_volume_type": "file",
            "data": {
                "device_path": str(service.path(volume.id)),
                "format": "raw",
                "access_mode": "rw",
                "volume_id": volume.id,
            },
        }
        assert await _status(service, volume.id) == "attaching"
        await service.attachment_complete(attachment.id)
        shown = await service.get(volume.id)
        assert shown is not None and shown.status == "in-use"
        assert [(a.status, a.server_id, a.mountpoint) for a in shown.attachments] == [
            ("attached", SERVER_A, "/dev/vdb")
        ]
        assert shown.attachments[0].attached_at is not None

    async def test_delete_of_the_only_attachment_makes_the_volume_available(
        self, service: LocalVolumeService
    ) -> None:
        """attachment_delete with nothing remaining -> available, no attachments."""
        volume = await _volume(service)
        attachment = await service.attachment_create(volume.id, SERVER_A, connector=CONNECTOR)
        await service.attachment_complete(attachment.id)
        await service.attachment_delete(attachment.id)
        shown = await service.get(volume.id)
        assert shown is not None and (shown.status, shown.attachments) == ("available", ())

    async def test_an_in_use_volume_is_refused_to_another_server(
        self, service: LocalVolumeService
    ) -> None:
        """A non-multiattach in-use volume cannot be reserved for a second server (400)."""
        volume = await _volume(service)
        first = await service.attachment_create(volume.id, SERVER_A, connector=CONNECTOR)
        await service.attachment_complete(first.id)
        with pytest.raises(errors.InvalidVolume) as caught:
            await service.attachment_create(volume.id, SERVER_B)
        assert errors.http_fault(caught.value) == (400, "badRequest")
        assert "status must be available or downloading to reserve" in caught.value.message
        assert "current status is in-use" in caught.value.message
        assert await _status(service, volume.id) == "in-use"

    async def test_the_same_server_gets_a_second_attachment_and_the_volume_stays_in_use(
        self, service: LocalVolumeService
    ) -> None:
        """LP 1694530: new attachment first, old one deleted second; never available between."""
        volume = await _volume(service)
        old = await service.attachment_create(volume.id, SERVER_A, connector=CONNECTOR)
        await service.attachment_complete(old.id)
        new = await service.attachment_create(volume.id, SERVER_A)
        assert new.status == "reserved"
        assert await _status(service, volume.id) == "in-use"
        await service.attachment_delete(old.id)
        assert await _status(service, volume.id) == "reserved"
        await service.attachment_update(new.id, CONNECTOR)
        assert await _status(service, volume.id) == "attaching"
        await service.attachment_complete(new.id)
        shown = await service.get(volume.id)
        assert shown is not None and shown.status == "in-use"
        assert [a.id for a in shown.attachments] == [new.id]

    async def test_remaining_attachment_decides_the_status_after_a_delete(
        self, service: LocalVolumeService
    ) -> None:
        """Deleting the reserved one of (attached, reserved) leaves the volume in-use."""
        volume = await _volume(service)
        old = await service.attachment_create(volume.id, SERVER_A, connector=CONNECTOR)
        await service.attachment_complete(old.id)
        new = await service.attachment_create(volume.id, SERVER_A)
        await service.attachment_delete(new.id)
        assert await _status(service, volume.id) == "in-use"

    async def test_a_volume_in_error_takes_no_attachment(self, service: LocalVolumeService) -> None:
        """Cinder refuses attachments to a volume whose status holds 'error'."""
        volume = await _volume(service)
        await service.volumes.swap_status(volume.id, ("available",), "error", action="test")
        with pytest.raises(errors.InvalidVolume, match="error state"):
            await service.attachment_create(volume.id, SERVER_A)

    async def test_unknown_volume_and_attachment_are_not_found(
        self, service: LocalVolumeService
    ) -> None:
        """404s with Cinder's messages."""
        with pytest.raises(errors.VolumeNotFound):
            await service.attachment_create("44444444-4444-4444-8444-444444444444", SERVER_A)
        with pytest.raises(errors.VolumeAttachmentNotFound) as caught:
            await service.attachment_delete("55555555-5555-4555-8555-555555555555")
        assert errors.http_fault(caught.value) == (404, "itemNotFound")

    async def test_of_concurrent_attachment_creates_exactly_one_wins(
        self, service: LocalVolumeService
    ) -> None:
        """Twenty servers race for one available volume: one reservation, nineteen 400s."""
        volume = await _volume(service)
        servers = [f"{i:08d}-0000-4000-8000-000000000000" for i in range(20)]
        results = await asyncio.gather(
            *(service.attachment_create(volume.id, s) for s in servers), return_exceptions=True
        )
        won = [r for r in results if not isinstance(r, BaseException)]
        lost = [r for r in results if isinstance(r, BaseException)]
        assert len(won) == 1
        assert all(isinstance(r, errors.InvalidVolume) for r in lost)
        shown = await service.get(volume.id)
        assert shown is not None and shown.status == "reserved"
        assert [a.id for a in shown.attachments] == [won[0].id]


class TestFiles:
    async def test_a_blank_volume_is_a_sparse_raw_file_of_its_size(
        self, service: LocalVolumeService
    ) -> None:
        """size 1 -> a 1 GiB file that takes (almost) no space."""
        volume = await _volume(service)
        path = service.path(volume.id)
        assert path.name == f"volume-{volume.id}"
        assert path.stat().st_size == GiB
        assert path.stat().st_blocks * 512 < 1024 * 1024

    async def test_a_volume_from_an_image_holds_its_bytes_and_metadata(
        self, service: LocalVolumeService
    ) -> None:
        """Created from an image: the image's bytes first, bootable, Cinder's image metadata."""
        image = _image(len(PATTERN))
        volume = await _volume(service, image=image)
        with service.path(volume.id).open("rb") as f:
            assert f.read(len(PATTERN)) == PATTERN
        assert volume.bootable
        assert volume.volume_image_metadata == {
            "image_id": image.id,
            "image_name": "img",
            "checksum": "c0ffee",
            "disk_format": "raw",
            "container_format": "bare",
            "size": str(len(PATTERN)),
            "min_disk": "0",
            "min_ram": "64",
        }

    async def test_an_image_larger_than_the_volume_is_refused(
        self, service: LocalVolumeService
    ) -> None:
        """Cinder's 400: the image's size exceeds the volume's."""
        with pytest.raises(errors.VolumeSizeTooSmall) as caught:
            await _volume(service, image=_image(2 * GiB))
        assert errors.http_fault(caught.value) == (400, "badRequest")
        assert await service.volumes.list_volumes() == []

    async def test_delete_refuses_an_attached_volume_then_removes_file_and_row(
        self, service: LocalVolumeService
    ) -> None:
        """in-use -> 400 with Cinder's message; available -> file and record gone."""
        volume = await _volume(service)
        attachment = await service.attachment_create(volume.id, SERVER_A, connector=CONNECTOR)
        await service.attachment_complete(attachment.id)
        with pytest.raises(errors.InvalidVolume, match="Volume status must be available or error"):
            await service.delete(volume.id)
        await service.attachment_delete(attachment.id)
        await service.delete(volume.id)
        assert await service.get(volume.id) is None
        assert not service.path(volume.id).exists()

    async def test_reimage_of_a_reserved_volume_rewrites_it_and_keeps_it_reserved(
        self, service: LocalVolumeService
    ) -> None:
        """reimage_reserved=True: reserved -> downloading -> reserved, new bytes and metadata."""
        volume = await _volume(service)
        service.path(volume.id).write_bytes(b"old" * 1000)
        attachment = await service.attachment_create(volume.id, SERVER_A)
        image = _image(len(PATTERN), image_id="66666666-6666-4666-8666-666666666666")
        await service.reimage(volume.id, image, reimage_reserved=True)
        shown = await service.get(volume.id)
        assert shown is not None and shown.status == "reserved"
        assert [a.id for a in shown.attachments] == [attachment.id]
        assert shown.volume_image_metadata["image_id"] == image.id
        with service.path(volume.id).open("rb") as f:
            assert f.read(len(PATTERN)) == PATTERN
        assert service.path(volume.id).stat().st_size == GiB

    async def test_reimage_of_a_reserved_volume_needs_reimage_reserved(
        self, service: LocalVolumeService
    ) -> None:
        """reserved without the flag, or in-use, is a 400; the status is unchanged."""
        volume = await _volume(service)
        await service.attachment_create(volume.id, SERVER_A)
        with pytest.raises(errors.InvalidVolume, match="available or error to reimage"):
            await service.reimage(volume.id, _image(len(PATTERN)), reimage_reserved=False)
        assert await _status(service, volume.id) == "reserved"
