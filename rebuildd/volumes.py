"""The local VolumeService (the embedded default): volumes are files on this host, their state
and attachments in the Store, with Cinder's semantics.

Owns the volume files under ``<state_dir>/volumes/volume-<uuid>`` and the connection_info that
points libvirt at them. A volume file is **sparse raw**: what Cinder's NFS and generic file
drivers make, what QEMU reads without a format layer, and what an operator (or a test) can
read and write with ordinary tools — a GiB costs no space until written. A volume made from an
image, and a re-image, is a full copy of the image cache's base (hashed and inspected there
before any qemu-img reads it) converted to raw (``qemu-img convert -f <disk_format>``, through
disks.py), never an overlay: a volume must not depend on a base the cache may remove. State
changes go through :class:`~rebuildd.volumestore.VolumeStore` (compare-and-swap each).
It must not call libvirt.
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import structlog

from rebuildd import errors, ports
from rebuildd.disks import DiskManager
from rebuildd.instance_events import Event, InstanceEvents
from rebuildd.models import Image, RequestContext, Volume, VolumeAttachment, utcnow
from rebuildd.volumestore import VolumeStore, reimage_expected

log = structlog.get_logger("rebuildd.volumes")
GiB: Final = 1024**3
FORMAT: Final = "raw"
MAX_SIZE_GB: Final = 2147483647  # Cinder's DB_MAX_INT: the size column is a 32-bit integer
# The filesystem refused the bytes: a clean 413 to the caller, never the host path.
_NO_SPACE: Final = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def image_metadata(image: Image) -> dict[str, str]:
    """Cinder's ``volume_image_metadata`` for a volume made from (or re-imaged with) ``image``."""
    fields = {
        "image_id": image.id,
        "image_name": image.name,
        "checksum": image.checksum,
        "disk_format": image.disk_format,
        "container_format": image.container_format,
        "size": image.size,
        "min_disk": image.min_disk,
        "min_ram": image.min_ram,
    }
    return {key: str(value) for key, value in fields.items() if value is not None}


class LocalVolumeService:
    """Volumes as sparse raw files, attachments in the Store (the VolumeService port)."""

    def __init__(
        self,
        volumes: VolumeStore,
        directory: Path,
        disks: DiskManager,
        cache: ports.ImageCache,
        *,
        events: InstanceEvents | None = None,
        max_size_gb: int = MAX_SIZE_GB,
    ) -> None:
        self.volumes = volumes
        self.max_size_gb = max_size_gb
        self.directory = directory
        self.disks = disks
        self.cache = cache
        # Where a re-image is announced, as Cinder posts volume-reimaged to Nova's
        # os-server-external-events: the compute waits for it the same way for both.
        self.events = events or InstanceEvents()

    def path(self, volume_id: str) -> Path:
        return self.directory / f"volume-{uuid.UUID(volume_id)}"

    def connection_info(self, volume_id: str) -> dict[str, Any]:
        return {
            "driver_volume_type": "file",
            "data": {
                "device_path": str(self.path(volume_id)),
                "format": FORMAT,
                "access_mode": "rw",
                "volume_id": volume_id,
            },
        }

    # -- the port -------------------------------------------------------------------------------

    async def get(self, volume_id: str) -> Volume | None:
        return await self.volumes.get(volume_id)

    async def attachment_create(
        self, volume_id: str, server_id: str, *, connector: Mapping[str, Any] | None = None
    ) -> VolumeAttachment:
        attachment = await self.volumes.reserve(volume_id, server_id, str(uuid.uuid4()))
        if connector is not None:
            return await self.attachment_update(attachment.id, connector)
        return attachment

    async def attachment_update(
        self, attachment_id: str, connector: Mapping[str, Any], *, mountpoint: str | None = None
    ) -> VolumeAttachment:
        attachment = await self.volumes.get_attachment(attachment_id)
        return await self.volumes.connect(
            attachment_id,
            connector=connector,
            connection_info=self.connection_info(attachment.volume_id),
            mountpoint=mountpoint,
        )

    async def attachment_complete(self, attachment_id: str) -> None:
        await self.volumes.complete(attachment_id)

    async def attachment_delete(self, attachment_id: str) -> None:
        await self.volumes.delete_attachment(attachment_id)

    async def create(
        self,
        context: RequestContext,
        *,
        size: int,
        name: str | None = None,
        image: Image | None = None,
        description: str | None = None,
    ) -> Volume:
        if size <= 0:
            raise errors.Invalid(
                f"Invalid input received: Invalid volume size provided for create request: "
                f"{size} (size argument must be an integer (or string representation of an "
                "integer) and greater than zero)."
            )
        self.check_size(size)
        if image is not None:
            check_image_fits(image, size)
        now = utcnow()
        volume = await self.volumes.add(
            Volume(
                id=str(uuid.uuid4()),
                name=name,
                description=description,
                size=size,
                status="creating",
                project_id=context.project_id,
                user_id=context.user_id,
                bootable=image is not None,
                multiattach=False,
                volume_type=None,
                attachments=(),
                volume_image_metadata=image_metadata(image) if image is not None else {},
                created_at=now,
                updated_at=now,
            )
        )
        try:
            await self._write(volume.id, size, image)
        except errors.InsufficientStorage:
            # Refused to the caller, who gets no id: nothing of it is left.
            await self.volumes.swap_status(volume.id, ("creating",), "deleting", action="create")
            await self.volumes.remove(volume.id)
            raise
        except BaseException:
            await self.volumes.swap_status(volume.id, ("creating",), "error", action="create")
            raise
        return await self.volumes.swap_status(
            volume.id, ("creating",), "available", action="create"
        )

    async def delete(self, volume_id: str) -> None:
        await self.volumes.begin_delete(volume_id)
        try:
            await self.disks.remove(self.path(volume_id))
        except OSError:
            await self.volumes.swap_status(
                volume_id, ("deleting",), "error_deleting", action="delete"
            )
            raise
        await self.volumes.remove(volume_id)

    async def reimage(self, volume_id: str, image: Image, *, reimage_reserved: bool) -> None:
        volume = await self.volumes.get(volume_id)
        if volume is None:
            raise errors.VolumeNotFound(volume_id=volume_id)
        check_image_fits(image, volume.size)
        expected = reimage_expected(reimage_reserved)
        # From exactly the status just read, so the volume goes back to what it really was.
        previous = volume.status
        await self.volumes.swap_status(
            volume_id,
            (previous,) if previous in expected else expected,
            "downloading",
            action="reimage",
        )
        try:
            await self._write(volume_id, volume.size, image)
        except BaseException:
            await self.volumes.swap_status(volume_id, ("downloading",), "error", action="reimage")
            raise
        await self.volumes.swap_status(
            volume_id,
            ("downloading",),
            previous,
            action="reimage",
            changes={"volume_image_metadata": image_metadata(image), "bootable": True},
        )
        log.info("volume re-imaged", volume_id=volume_id, image_id=image.id)
        for attachment in volume.attachments:
            self.events.deliver(Event(attachment.server_id, "volume-reimaged", tag=volume_id))

    def check_size(self, size: int) -> None:
        """Cinder's per-volume limit: 413 naming it."""
        if size > self.max_size_gb:
            raise errors.VolumeSizeExceedsLimit(size=size, limit=self.max_size_gb)

    # -- helpers --------------------------------------------------------------------------------

    async def _write(self, volume_id: str, size: int, image: Image | None) -> None:
        source = await self.cache.ensure(image) if image is not None else None
        try:
            await self.disks.write_volume(
                path=self.path(volume_id),
                size_bytes=size * GiB,
                source=source,
                source_format=(image.disk_format or "raw") if image is not None else "raw",
            )
        except errors.DiskError as exc:
            cause = exc.__cause__
            if isinstance(cause, OSError) and cause.errno in _NO_SPACE:
                raise errors.InsufficientStorage(
                    what="a volume", size=size, reason=os.strerror(cause.errno)
                ) from None
            raise


def check_image_fits(image: Image, size: int) -> None:
    """Cinder's checks of an image against the volume of ``size`` GiB it goes into (400 each):
    also made at a server create's API, before the job makes the volume."""
    if image.status != "active":
        raise errors.ImageNotActive(image_id=image.id)
    needed = max(image.virtual_size or 0, image.size or 0)
    if needed > size * GiB:
        raise errors.VolumeSizeTooSmall(image_size=-(-needed // GiB), volume_size=size)
    if image.min_disk > size:
        raise errors.VolumeSizeTooSmall(image_size=image.min_disk, volume_size=size)
