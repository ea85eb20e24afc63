"""Routes: Nova's volume attachments of a server, ``/v2.1/servers/{id}/os-volume_attachments``
(list, show, attach, detach), with Nova's microversion behaviour: 2.49 ``tag`` on attach,
2.70 ``tag`` in the view, 2.79 ``delete_on_termination``, 2.89 ``attachment_id`` and
``bdm_uuid`` in list and show (whose duplicate ``id`` goes).

Owns the HTTP side only: parse, call volume_jobs or read the Store, render the view.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from rebuildd import errors, schemas, volume_jobs
from rebuildd.api import ContextDep, Services, ServicesDep, VersionDep, faults, read_json
from rebuildd.microversion import Version
from rebuildd.models import BlockDevice, RequestContext, Server

router = APIRouter(tags=["servers"], responses=faults(406))

_UUID = r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$"
_DEVICE = r"(^/dev/x{0,1}[a-z]{0,1}d{0,1})([a-z]+)[0-9]*$"  # Nova's schema


class AttachV21(BaseModel):
    model_config = ConfigDict(extra="forbid")

    volumeId: str = Field(pattern=_UUID)
    device: str | None = Field(default=None, pattern=_DEVICE)


class AttachV249(AttachV21):
    tag: str | None = Field(default=None, min_length=1, max_length=60, pattern=r"^[^,/]*$")


class AttachV279(AttachV249):
    delete_on_termination: bool = False


def _attach_model(version: Version) -> type[AttachV21]:
    if version.at_least("2.79"):
        return AttachV279
    if version.at_least("2.49"):
        return AttachV249
    return AttachV21


def attachment_view(device: BlockDevice, version: Version, *, listing: bool) -> dict[str, Any]:
    """Nova's ``_translate_attachment_detail_view`` (``listing``: list and show, which gain
    2.89's fields; the attach answer does not)."""
    view: dict[str, Any] = {}
    if not (listing and version.at_least("2.89")):
        view["id"] = device.volume_id
    view.update(
        {
            "serverId": device.server_id,
            "volumeId": device.volume_id,
            "device": f"/dev/{device.device_name}",
        }
    )
    if version.at_least("2.70"):
        view["tag"] = device.tag
    if version.at_least("2.79"):
        view["delete_on_termination"] = device.delete_on_termination
    if listing and version.at_least("2.89"):
        view["attachment_id"] = device.attachment_id
        view["bdm_uuid"] = device.id
    return view


async def _server(services: Services, ctx: RequestContext, server_id: str, rule: str) -> Server:
    project = None if ctx.is_admin else ctx.project_id
    server = await services.store.get_server(server_id, project_id=project)
    services.policy.authorize(
        f"os_compute_api:os-volumes-attachments:{rule}", ctx, server.project_id
    )
    return server


def _volumes(devices: list[BlockDevice]) -> list[BlockDevice]:
    return [d for d in devices if d.destination_type == "volume" and d.volume_id]


@router.get(
    "/servers/{server_id}/os-volume_attachments",
    name="list_volume_attachments",
    responses=faults(404),
)
async def list_volume_attachments(
    server_id: str, services: ServicesDep, ctx: ContextDep, version: VersionDep
) -> dict[str, Any]:
    server = await _server(services, ctx, server_id, "index")
    devices = _volumes(await services.store.get_block_devices(server.id))
    return {"volumeAttachments": [attachment_view(d, version, listing=True) for d in devices]}


@router.get(
    "/servers/{server_id}/os-volume_attachments/{volume_id}",
    name="show_volume_attachment",
    responses=faults(404),
)
async def show_volume_attachment(
    server_id: str, volume_id: str, services: ServicesDep, ctx: ContextDep, version: VersionDep
) -> dict[str, Any]:
    server = await _server(services, ctx, server_id, "show")
    try:
        device = volume_jobs.volume_device(
            await services.store.get_block_devices(server.id), volume_id
        )
    except errors.VolumeBDMNotFound:
        raise errors.NotFound(
            f"Instance {server.id} is not attached to volume {volume_id}"
        ) from None
    return {"volumeAttachment": attachment_view(device, version, listing=True)}


@router.post(
    "/servers/{server_id}/os-volume_attachments",
    name="attach_volume",
    responses=faults(400, 404, 409),
)
async def attach_volume(
    server_id: str, request: Request, services: ServicesDep, ctx: ContextDep, version: VersionDep
) -> dict[str, Any]:
    """200 once the volume is reserved and the device chosen; the attach itself runs as an
    instance action (``attach_volume``), as Nova casts it to the compute service."""
    body = await read_json(request)
    if not isinstance(body, dict) or set(body) != {"volumeAttachment"}:
        raise errors.ValidationFailed(
            field="volumeAttachment",
            value=schemas.show(body),
            reason="'volumeAttachment' is a required property",
        )
    model = schemas.validate(
        _attach_model(version), body["volumeAttachment"], field="volumeAttachment"
    )
    spec = volume_jobs.AttachSpec(
        volume_id=model.volumeId,
        device=model.device,
        tag=getattr(model, "tag", None),
        delete_on_termination=getattr(model, "delete_on_termination", False),
    )
    device = await volume_jobs.request_attach(
        services.deps, services.volume_store, ctx, server_id, spec
    )
    return {"volumeAttachment": attachment_view(device, version, listing=False)}


@router.delete(
    "/servers/{server_id}/os-volume_attachments/{volume_id}",
    name="detach_volume",
    status_code=202,
    responses=faults(400, 404, 409),
)
async def detach_volume(
    server_id: str, volume_id: str, services: ServicesDep, ctx: ContextDep
) -> Response:
    await volume_jobs.request_detach(
        services.deps, services.volume_store, ctx, server_id, volume_id
    )
    return Response(status_code=202)
