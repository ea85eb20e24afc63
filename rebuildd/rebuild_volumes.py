"""A rebuild's volumes: Nova's attachment dance, and the re-image of a root volume (2.93+).

Owns what a rebuild does to the Cinder attachments of a server's volumes, in Nova's order: a
new attachment for each volume is created *before* the old one is deleted, so a volume is never
``available`` — never free to another server — while its server is rebuilt; after the domain
has let go of the disks the old attachments are deleted; the root volume of a volume-backed
server is re-imaged (2.93+) while only the new, still empty attachment holds it (``reserved``);
then each new attachment gets this host's connector (-> connection_info), its ``<disk>`` goes
back on its target, and the attachment is completed (``in-use``).

The re-image ends when the volume service announces ``volume-reimaged`` (Cinder posts it to
``os-server-external-events``; the local volumes deliver it in process), within a time that
scales with the image's size.

Every undo here is one idempotent, state-based function (:func:`restore`): it asks the volume
service which attachments the server holds and keeps the old one when it still exists, else
completes the new one — so it is right after a crash at any point, even between a Cinder call
and the journal write that would have recorded its result, and it deletes any stray
attachment it finds. A re-imaged root volume cannot be un-imaged (Nova's neither): a failure
after it leaves the server on its volume with the new image's bytes, attached as before.

Imports only ports and pure modules (the pipeline's context type only for type checking).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Final

from rebuildd import domxml, errors
from rebuildd.connector import host_connector
from rebuildd.models import BlockDevice, Image, Volume

if TYPE_CHECKING:
    from rebuildd.pipeline import Deps, RebuildContext, RebuildSpec

GiB: Final = 1024**3


def volumes_of(devices: list[BlockDevice]) -> list[BlockDevice]:
    """The server's volume mappings (root volume included), in target order."""
    found = [d for d in devices if d.destination_type == "volume" and d.volume_id]
    return sorted(found, key=lambda d: d.device_name)


def is_volume_backed(root: BlockDevice) -> bool:
    return root.destination_type == "volume"


# -- api stage ---------------------------------------------------------------------------------


async def check_root(deps: Deps, spec: RebuildSpec, root: BlockDevice, image: Image) -> None:
    """Nova's checks of a volume-backed rebuild (400): no trusted certificates, and below
    2.93 no other image than the one in the root volume."""
    if isinstance(spec.trusted_certs, tuple) and spec.trusted_certs:  # Nova cannot validate
        raise errors.CertificateValidationFailed(
            reason="Image certificate validation is not supported for volume-backed servers."
        )
    assert root.volume_id is not None
    volume = await deps.volumes.get(root.volume_id)
    current = volume.volume_image_metadata.get("image_id") if volume else None
    if current != image.id and not spec.reimage_boot_volume:
        raise errors.ImageUnacceptable(
            image_id=image.id,
            reason="Unable to rebuild with a different image for a volume-backed server.",
        )


async def check_attached(deps: Deps, devices: list[BlockDevice]) -> None:
    """Nova's _check_volume_status: every attached volume must be in-use (400)."""
    for device in volumes_of(devices):
        assert device.volume_id is not None
        volume = await deps.volumes.get(device.volume_id)
        status = volume.status if volume is not None else "deleted"
        if status != "in-use":
            raise errors.InvalidVolume(
                reason=f"volume '{device.volume_id}' status must be 'in-use'. Currently in "
                f"'{status}' status"
            )


# -- compute stage -----------------------------------------------------------------------------


async def record(ctx: RebuildContext) -> None:
    """Which attachment each volume holds now (part of the step that records the disks)."""
    ctx.facts.old_attachments = {
        d.id: d.attachment_id for d in ctx.volumes if d.attachment_id is not None
    }


async def reserve(ctx: RebuildContext) -> None:
    """A new, empty attachment per volume, before any old one goes (Nova's
    detach_block_devices): the volume stays reserved or in-use throughout."""
    for device in ctx.volumes:
        if device.id in ctx.facts.new_attachments:
            continue
        assert device.volume_id is not None
        attachment = await ctx.deps.volumes.attachment_create(device.volume_id, ctx.server.id)
        ctx.facts.new_attachments[device.id] = attachment.id


async def release_old(ctx: RebuildContext) -> None:
    """The old attachments go, once the domain no longer has the disks."""
    for device in ctx.volumes:
        old = ctx.facts.old_attachments.get(device.id)
        if old is not None and await _holds(ctx, device, old):
            await ctx.deps.volumes.attachment_delete(old)


async def reimage_root(ctx: RebuildContext) -> None:
    """2.93+: the root volume is rewritten from the image while only the new, empty
    attachment holds it; the wait scales with the image's size and is never zero (Nova's
    bug 2062127: a size-0 snapshot image got a zero timeout)."""
    if not ctx.reimage_root:
        return
    assert ctx.root.volume_id is not None
    image = ctx.image or await ctx.deps.images.get(None, ctx.image_id)
    if image is None:
        raise errors.ImageFetchError(image_id=ctx.image_id, reason="the image no longer exists")
    timeout = reimage_timeout(image, ctx.deps.reimage_timeout_per_gb)
    expected = [("volume-reimaged", ctx.root.volume_id)]
    # Registered before the request, so an event that comes back at once is not missed.
    async with ctx.deps.instance_events.expecting(ctx.server.id, expected, timeout=timeout):
        await ctx.deps.volumes.reimage(ctx.root.volume_id, image, reimage_reserved=True)


def reimage_timeout(image: Image, per_gb: float) -> float:
    """Nova's ``reimage_timeout_per_gb`` times the image's size in GiB, rounded up — but at
    least one GiB's worth, so a snapshot image of size 0 does not get a zero timeout."""
    gigabytes = max(1, math.ceil(max(image.size or 0, image.virtual_size or 0) / GiB))
    return per_gb * gigabytes


async def connect(ctx: RebuildContext) -> None:
    """This host's connector on each new attachment: its connection_info says where the
    volume's disk is."""
    connector = host_connector(ctx.deps.host)
    for device in ctx.volumes:
        attachment = await ctx.deps.volumes.attachment_update(
            ctx.facts.new_attachments[device.id],
            connector,
            mountpoint=f"/dev/{device.device_name}",
        )
        if attachment.connection_info is None:
            raise errors.OperationFailed(
                step="connect_volumes", reason=f"volume {device.volume_id} gave no connection"
            )
        ctx.facts.connection_info[device.id] = attachment.connection_info


def disks(ctx: RebuildContext) -> list[str]:
    """The volumes' ``<disk>`` elements on their targets, from the new connection_info (the
    old element renewed when there was one, so its serial, boot order and address stay)."""
    found = []
    for device in ctx.volumes:
        assert device.volume_id is not None
        info = ctx.facts.connection_info[device.id]
        fresh = domxml.volume_disk(
            device.device_name, info, volume_id=device.volume_id, bus=device.disk_bus
        )
        old = ctx.facts.old_disks.get(device.device_name)
        found.append(domxml.to_string(domxml.renewed(old, fresh) if old else fresh))
    return found


async def complete(ctx: RebuildContext) -> None:
    for device in ctx.volumes:
        await ctx.deps.volumes.attachment_complete(ctx.facts.new_attachments[device.id])


async def restore(ctx: RebuildContext) -> None:
    """Undo of every volume step: each volume ends with exactly one attachment of this server,
    attached — the old one while it exists, else the new one, connected and completed."""
    connector = host_connector(ctx.deps.host)
    for device in ctx.volumes:
        assert device.volume_id is not None
        volume = await ctx.deps.volumes.get(device.volume_id)
        if volume is None:
            continue
        mine = [a for a in volume.attachments if a.server_id == ctx.server.id]
        ids = {a.id for a in mine}
        old = ctx.facts.old_attachments.get(device.id)
        new = ctx.facts.new_attachments.get(device.id)
        keep = old if old in ids else new if new in ids else next(iter(sorted(ids)), None)
        if keep is None:  # nothing holds it any more: hold it again
            keep = (await ctx.deps.volumes.attachment_create(device.volume_id, ctx.server.id)).id
            mine = []
        for attachment in mine:
            if attachment.id != keep:
                await ctx.deps.volumes.attachment_delete(attachment.id)
        kept = next((a for a in mine if a.id == keep), None)
        if kept is None or kept.status != "attached":
            updated = await ctx.deps.volumes.attachment_update(
                keep, connector, mountpoint=f"/dev/{device.device_name}"
            )
            await ctx.deps.volumes.attachment_complete(keep)
            if updated.connection_info is not None:
                ctx.facts.connection_info[device.id] = updated.connection_info
        ctx.facts.kept_attachments[device.id] = keep


def succeeded(ctx: RebuildContext) -> dict[str, dict[str, Any]]:
    """The volume mappings' new attachment and connection_info."""
    return {
        d.id: {
            "attachment_id": ctx.facts.new_attachments[d.id],
            "connection_info": ctx.facts.connection_info.get(d.id),
        }
        for d in ctx.volumes
        if d.id in ctx.facts.new_attachments
    }


def rolled_back(ctx: RebuildContext) -> dict[str, dict[str, Any]]:
    """The attachment each volume mapping holds after the undo (the new one if the old was
    already gone)."""
    changes: dict[str, dict[str, Any]] = {}
    for device in ctx.volumes:
        keep = ctx.facts.kept_attachments.get(device.id)
        if keep is not None and keep != device.attachment_id:
            changes[device.id] = {
                "attachment_id": keep,
                "connection_info": ctx.facts.connection_info.get(device.id),
            }
    return changes


async def _holds(ctx: RebuildContext, device: BlockDevice, attachment_id: str) -> bool:
    assert device.volume_id is not None
    volume: Volume | None = await ctx.deps.volumes.get(device.volume_id)
    return volume is not None and any(a.id == attachment_id for a in volume.attachments)
