"""Volumes of a new server: boot from volume and data volumes given at create
(``block_device_mapping_v2``), and releasing them when the server is deleted.

Owns what the build pipeline does with volumes, as Nova's compute does in
``_prep_block_device`` and ``_shutdown_instance``: a volume made from an image (``source_type:
image, destination_type: volume``) is created and filled, then every volume gets an attachment
(reserve), this host's connector (-> connection_info), its ``<disk>`` in the new domain, and the
attachment is completed before the guest starts. The undo deletes the attachments it made and
the volumes it created. On delete, each attachment is deleted, and the volume too when its
mapping says ``delete_on_termination``.

Imports only ports and pure modules (the lifecycle's context type only for type checking).
"""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from rebuildd import domxml, errors
from rebuildd.connector import host_connector
from rebuildd.models import BlockDevice, Image, RequestContext
from rebuildd.volumes import check_image_fits

if TYPE_CHECKING:
    from rebuildd.lifecycle import ServerContext
    from rebuildd.pipeline import Deps

ROOT_TARGET: Final = "vda"


@dataclass(frozen=True, slots=True)
class Mapping:
    """One entry of ``block_device_mapping_v2`` that rebuildd supports."""

    source_type: str  # image | volume
    destination_type: str  # volume
    uuid: str
    boot_index: int | None
    volume_size: int | None = None  # GiB, for a volume made from an image
    delete_on_termination: bool = False
    device_name: str | None = None
    tag: str | None = None


@dataclass(slots=True)
class BuildFacts:
    """What the build's volume steps made, by block device id, for their undo."""

    created_volumes: dict[str, str] = field(default_factory=dict)  # made from an image
    attachments: dict[str, str] = field(default_factory=dict)
    connection_info: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BuildFacts:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def root_mapping(mappings: tuple[Mapping, ...]) -> Mapping | None:
    return next((m for m in mappings if m.boot_index == 0), None)


async def check(
    deps: Deps, request: RequestContext, mappings: tuple[Mapping, ...], image_ref: str | None
) -> Image | None:
    """Nova's block device checks of a create (400), in its order; returns the image the
    server boots from (the root volume's source), or None for an existing root volume."""
    root = root_mapping(mappings)
    if root is None and not image_ref:
        raise errors.InvalidBDM(
            reason="Boot sequence for the instance and image/block device mapping combination "
            "is not valid."
        )
    if sum(1 for m in mappings if m.boot_index == 0) > 1:
        raise errors.InvalidBDM(reason="Boot sequence for the instance is not valid.")
    image: Image | None = None
    for mapping in mappings:
        if mapping.source_type == "image":
            if not mapping.volume_size:
                raise errors.InvalidBDM(
                    reason="Images with destination_type 'volume' need to have a non-zero size "
                    "specified"
                )
            found = await deps.images.get(request, mapping.uuid)
            if found is None:
                raise errors.ImageNotFound(image_id=mapping.uuid)
            check_image_fits(found, mapping.volume_size)  # else ERROR in the job
            if mapping.boot_index == 0:
                image = found
        else:
            volume = await deps.volumes.get(mapping.uuid)
            if volume is None or (not request.is_admin and volume.project_id != request.project_id):
                raise errors.VolumeNotFound(volume_id=mapping.uuid)
            if volume.status != "available":
                raise errors.InvalidVolume(
                    reason=f"volume '{volume.id}' status must be 'available'. Currently in "
                    f"'{volume.status}' status"
                )
            if mapping.boot_index == 0 and volume.volume_image_metadata.get("image_id"):
                image = await deps.images.get(None, volume.volume_image_metadata["image_id"])
    return image


def devices(server_id: str, mappings: tuple[Mapping, ...], used: set[str]) -> list[BlockDevice]:
    """The volume mappings of a new server: the root volume on vda, the others on the next
    free ``vd*`` (or the one asked for)."""
    found = []
    taken = set(used)
    for mapping in sorted(mappings, key=lambda m: (m.boot_index != 0, m.boot_index or 0)):
        if mapping.boot_index == 0:
            target = ROOT_TARGET
        elif mapping.device_name and mapping.device_name.removeprefix("/dev/") not in taken:
            target = mapping.device_name.removeprefix("/dev/")
        else:
            target = next(f"vd{c}" for c in "bcdefghijklmnopqrstuvwxyz" if f"vd{c}" not in taken)
        taken.add(target)
        from_image = mapping.source_type == "image"
        found.append(
            BlockDevice(
                id=str(uuid.uuid4()),
                server_id=server_id,
                boot_index=mapping.boot_index,
                source_type=mapping.source_type,
                destination_type="volume",
                device_name=target,
                image_id=mapping.uuid if from_image else None,
                volume_id=None if from_image else mapping.uuid,
                path=None,
                disk_bus="virtio",
                device_type="disk",
                size_mib=(mapping.volume_size or 0) * 1024 if from_image else None,
                delete_on_termination=mapping.delete_on_termination,
                tag=mapping.tag,
            )
        )
    return found


def volumes_of(devices: tuple[BlockDevice, ...]) -> list[BlockDevice]:
    return [d for d in devices if d.destination_type == "volume"]


async def prepare(ctx: ServerContext) -> None:
    """Create the volumes made from images, then attach each: reserve, connect."""
    deps, facts = ctx.deps, ctx.facts
    connector = host_connector(deps.host)
    for device in volumes_of(ctx.devices):
        volume_id = device.volume_id or facts.created_volumes.get(device.id)
        if volume_id is None:
            assert device.image_id is not None and device.size_mib is not None
            image = await deps.images.get(None, device.image_id)
            if image is None:
                raise errors.ImageFetchError(image_id=device.image_id, reason="it is gone")
            volume = await deps.volumes.create(
                ctx.request, size=device.size_mib // 1024, image=image, name=""
            )
            volume_id = facts.created_volumes[device.id] = volume.id
        if device.id not in facts.attachments:
            attachment = await deps.volumes.attachment_create(volume_id, ctx.server.id)
            facts.attachments[device.id] = attachment.id
        updated = await deps.volumes.attachment_update(
            facts.attachments[device.id], connector, mountpoint=f"/dev/{device.device_name}"
        )
        if updated.connection_info is None:
            raise errors.OperationFailed(
                step="block_device_mapping", reason=f"volume {volume_id} gave no connection"
            )
        facts.connection_info[device.id] = updated.connection_info


async def undo_prepare(ctx: ServerContext) -> None:
    for attachment_id in ctx.facts.attachments.values():
        with contextlib.suppress(errors.NotFound):  # already gone: undone before a crash
            await ctx.deps.volumes.attachment_delete(attachment_id)
    for volume_id in ctx.facts.created_volumes.values():
        with contextlib.suppress(errors.NotFound):
            await ctx.deps.volumes.delete(volume_id)


def disks(ctx: ServerContext) -> list[domxml.Element]:
    """The volumes' ``<disk>`` elements for the new domain."""
    found = []
    for device in volumes_of(ctx.devices):
        volume_id = device.volume_id or ctx.facts.created_volumes[device.id]
        found.append(
            domxml.volume_disk(
                device.device_name,
                ctx.facts.connection_info[device.id],
                volume_id=volume_id,
                bus=device.disk_bus,
            )
        )
    return found


async def complete(ctx: ServerContext) -> None:
    for device in volumes_of(ctx.devices):
        await ctx.deps.volumes.attachment_complete(ctx.facts.attachments[device.id])


def built(ctx: ServerContext) -> dict[str, dict[str, Any]]:
    """The volume mappings as the build left them: volume, attachment, connection_info."""
    return {
        d.id: {
            "volume_id": d.volume_id or ctx.facts.created_volumes[d.id],
            "attachment_id": ctx.facts.attachments[d.id],
            "connection_info": ctx.facts.connection_info[d.id],
        }
        for d in volumes_of(ctx.devices)
    }


async def release(ctx: ServerContext) -> None:
    """On delete: every attachment goes; a volume marked delete_on_termination goes too."""
    for device in await ctx.deps.store.get_block_devices(ctx.server.id):
        if device.destination_type != "volume" or device.volume_id is None:
            continue
        if device.attachment_id is not None:
            with contextlib.suppress(errors.NotFound):  # gone: a delete repeated after a crash
                await ctx.deps.volumes.attachment_delete(device.attachment_id)
        if device.delete_on_termination:
            with contextlib.suppress(errors.NotFound):
                await ctx.deps.volumes.delete(device.volume_id)
