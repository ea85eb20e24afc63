"""Routes: a Cinder-v3-compatible subset for rebuildd's local volumes, at /volume.

Owns the HTTP side of local volumes: version documents (what openstacksdk and openstackclient
discover v3 from), and ``/volume/v3/{project_id}/volumes`` — create from a size or an image,
list, detail, show, delete — in Cinder's view and with Cinder's statuses and fault bodies
(``{"badRequest": {"code": 400, "message": ...}}``, ``itemNotFound``; the same shapes as
Nova's). The project in the path is the caller's own, as Cinder requires; the caller's token
decides what it sees.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Final

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from rebuildd import errors, schemas, views
from rebuildd.api import BaseUrlDep, ContextDep, Services, ServicesDep, faults, read_json
from rebuildd.models import RequestContext, Volume
from rebuildd.volumes import MAX_SIZE_GB, LocalVolumeService

versions = APIRouter(tags=["volumes"])  # no authentication: clients discover with it
router = APIRouter(tags=["volumes"])

MIN_VERSION: Final = "3.0"
MAX_VERSION: Final = "3.71"  # Cinder 29 (2024.2); only the 3.0 view fields are served
_UPDATED: Final = "2023-08-31T00:00:00Z"
GiB: Final = 1024**3


def _version(base: str) -> dict[str, Any]:
    return {
        "id": "v3.0",
        "status": "CURRENT",
        "version": MAX_VERSION,
        "min_version": MIN_VERSION,
        "updated": _UPDATED,
        "links": [
            {"rel": "describedby", "type": "text/html", "href": "https://docs.openstack.org/"},
            {"rel": "self", "href": f"{base}/volume/v3/"},
        ],
        "media-types": [
            {"base": "application/json", "type": "application/vnd.openstack.volume+json;version=3"}
        ],
    }


@versions.get("", name="volume_versions", include_in_schema=False)
@versions.get(
    "/",
    name="volume_versions_slash",
    responses={300: {"description": "Multiple Choices: the API versions, as Cinder answers"}},
)
async def volume_versions(base: BaseUrlDep) -> JSONResponse:
    """Cinder answers its root with 300 Multiple Choices and the list of versions."""
    return JSONResponse({"versions": [_version(base)]}, status_code=300)


@versions.get("/v3", name="volume_version", include_in_schema=False)
@versions.get("/v3/", name="volume_version_slash")
async def volume_version(base: BaseUrlDep) -> dict[str, Any]:
    return {"versions": [_version(base)]}


# -- views ----------------------------------------------------------------------------------------


def _links(base: str, project_id: str, volume_id: str) -> list[dict[str, str]]:
    return [
        {"rel": "self", "href": f"{base}/volume/v3/{project_id}/volumes/{volume_id}"},
        {"rel": "bookmark", "href": f"{base}/volume/{project_id}/volumes/{volume_id}"},
    ]


def volume_summary(volume: Volume, base: str) -> dict[str, Any]:
    return {
        "id": volume.id,
        "name": volume.name,
        "links": _links(base, volume.project_id, volume.id),
    }


def volume_detail(volume: Volume, base: str, *, is_admin: bool) -> dict[str, Any]:
    """Cinder's ``ViewBuilder.detail``; ``attachments`` lists the attached ones only, as
    Cinder does (``host_name`` for admins)."""
    view: dict[str, Any] = {
        "id": volume.id,
        "status": volume.status,
        "size": volume.size,
        "availability_zone": volume.availability_zone,
        "created_at": views.microtime(volume.created_at),
        "updated_at": views.microtime(volume.updated_at),
        "attachments": [
            {
                "id": volume.id,
                "attachment_id": a.id,
                "volume_id": volume.id,
                "server_id": a.server_id,
                "host_name": (a.connector or {}).get("host") if is_admin else None,
                "device": a.mountpoint,
                "attached_at": views.microtime(a.attached_at),
            }
            for a in volume.attachments
            if a.status == "attached"
        ],
        "name": volume.name,
        "description": volume.description,
        "volume_type": volume.volume_type or "__DEFAULT__",
        "snapshot_id": None,
        "source_volid": None,
        "metadata": {},
        "links": _links(base, volume.project_id, volume.id),
        "user_id": volume.user_id,
        "bootable": "true" if volume.bootable else "false",
        "encrypted": False,
        "replication_status": None,
        "consistencygroup_id": None,
        "multiattach": volume.multiattach,
        "migration_status": None,
    }
    if volume.volume_image_metadata:
        view["volume_image_metadata"] = dict(volume.volume_image_metadata)
    if is_admin:
        view["os-vol-tenant-attr:tenant_id"] = volume.project_id
        view["os-vol-host-attr:host"] = None
        view["os-vol-mig-status-attr:migstat"] = None
        view["os-vol-mig-status-attr:name_id"] = None
    return view


# -- requests -------------------------------------------------------------------------------------


class VolumeCreate(BaseModel):
    """Cinder's create body, the part local volumes support (others are 400)."""

    model_config = ConfigDict(extra="forbid")

    size: Any = None  # checked by _size, with Cinder's words
    name: str | None = Field(default=None, max_length=255)
    description: str | None = Field(default=None, max_length=255)
    imageRef: str | None = None
    # Accepted and ignored, as a single-backend Cinder does with its default type and zone.
    volume_type: str | None = None
    availability_zone: str | None = None
    metadata: dict[str, str] | None = None
    consistencygroup_id: str | None = None
    snapshot_id: None = None
    source_volid: None = None
    backup_id: None = None
    multiattach: bool = False


def _size(value: Any) -> int | None:
    """Cinder's ``volume_size``: an integer or a string of digits (not a boolean), at most its
    DB_MAX_INT; 0 and below keep Cinder's older words. Anything else is a 400."""
    if value is None:
        return None
    shown = schemas.show(value)
    if isinstance(value, str) and _DIGITS.fullmatch(value) is None:
        raise errors.Invalid(
            f"Invalid input for field/attribute size. Value: {shown}. {shown} does not match "
            "'^[0-9]+$'"
        )
    if not isinstance(value, int | str) or isinstance(value, bool):
        raise errors.Invalid(
            f"Invalid input for field/attribute size. Value: {shown}. {shown} is not of type "
            "'integer', 'string'"
        )
    # Digits are counted before int() reads them: int() of thousands of digits is an error.
    if len(str(value).lstrip("-")) > _MAX_DIGITS or int(value) > MAX_SIZE_GB:
        raise errors.Invalid(
            f"Invalid input for field/attribute size. Value: {shown}. {shown} is greater than "
            f"the maximum of {MAX_SIZE_GB}"
        )
    return int(value)


_DIGITS: Final = re.compile(r"[0-9]+")
_MAX_DIGITS: Final = len(str(MAX_SIZE_GB))


# The project in the path; Cinder 3.67+ also serves every URL without it.
ProjectPath = str | None


def _project(ctx: RequestContext, project_id: str | None) -> None:
    """Cinder's check that the path's project is the caller's (an admin may name any)."""
    if project_id is not None and project_id != ctx.project_id and not ctx.is_admin:
        raise errors.Invalid("Malformed request url")


def _local(services: Services) -> LocalVolumeService:
    """The local volumes (these routes are served only with them: api.create_app)."""
    assert services.volumes is not None
    return services.volumes


async def _volume(services: Services, ctx: RequestContext, volume_id: str, rule: str) -> Volume:
    """The caller's project's volume (any, for an admin) that Cinder's ``rule`` lets it use:
    404 for another project's, 403 when the rule refuses (a reader deleting)."""
    project = None if ctx.is_admin else ctx.project_id
    volume = await services.volume_store.get(volume_id, project_id=project)
    if volume is None:
        raise errors.VolumeNotFound(volume_id=volume_id)
    services.policy.authorize(rule, ctx, volume.project_id)
    return volume


@router.post("/v3/volumes", status_code=202, include_in_schema=False)
@router.post(
    "/v3/{project_id}/volumes",
    name="create_volume",
    status_code=202,
    responses=faults(400, 404),
)
async def create_volume(
    request: Request,
    services: ServicesDep,
    ctx: ContextDep,
    base: BaseUrlDep,
    project_id: ProjectPath = None,
) -> JSONResponse:
    _project(ctx, project_id)
    services.policy.authorize("volume:create", ctx, ctx.project_id)
    body = await read_json(request)
    if not isinstance(body, dict) or "volume" not in body:
        raise errors.Invalid("Missing required element 'volume' in request body.")
    model = schemas.validate(VolumeCreate, body["volume"], field="volume")
    size = _size(model.size)
    image = None
    if model.imageRef is not None:
        image = await services.images.get(ctx, model.imageRef)
        if image is None:
            raise errors.Invalid("Invalid image identifier or unable to access requested image.")
        if size is None:
            needed = max(image.virtual_size or 0, image.size or 0)
            size = max(-(-needed // GiB), image.min_disk, 1)
    if size is None:
        raise errors.Invalid(
            "Invalid input received: Invalid volume size provided for create request: None "
            "(size argument must be an integer (or string representation of an integer) and "
            "greater than zero)."
        )
    volume = await _local(services).create(
        ctx, size=size, name=model.name, image=image, description=model.description
    )
    return JSONResponse(
        {"volume": volume_detail(volume, base, is_admin=ctx.is_admin)}, status_code=202
    )


def _all_tenants(value: str | None) -> bool:
    return (value or "").lower() not in {"", "0", "false", "off", "no"}


async def _listed(
    services: Services, ctx: RequestContext, name: str | None, all_tenants: str | None
) -> list[Volume]:
    services.policy.authorize("volume:get_all", ctx, ctx.project_id)
    project = None if ctx.is_admin and _all_tenants(all_tenants) else ctx.project_id
    volumes = await services.volume_store.list_volumes(project_id=project)
    if name is not None:
        volumes = [v for v in volumes if v.name == name]
    return volumes


NameQuery = Annotated[str | None, Query()]


@router.get("/v3/volumes", include_in_schema=False)
@router.get("/v3/{project_id}/volumes", name="list_volumes")
async def list_volumes(
    services: ServicesDep,
    ctx: ContextDep,
    base: BaseUrlDep,
    name: NameQuery = None,
    all_tenants: NameQuery = None,
    project_id: ProjectPath = None,
) -> dict[str, Any]:
    _project(ctx, project_id)
    volumes = await _listed(services, ctx, name, all_tenants)
    return {"volumes": [volume_summary(v, base) for v in volumes]}


@router.get("/v3/volumes/detail", include_in_schema=False)
@router.get("/v3/{project_id}/volumes/detail", name="list_volumes_detail")
async def list_volumes_detail(
    services: ServicesDep,
    ctx: ContextDep,
    base: BaseUrlDep,
    name: NameQuery = None,
    all_tenants: NameQuery = None,
    project_id: ProjectPath = None,
) -> dict[str, Any]:
    _project(ctx, project_id)
    volumes = await _listed(services, ctx, name, all_tenants)
    return {"volumes": [volume_detail(v, base, is_admin=ctx.is_admin) for v in volumes]}


@router.get("/v3/volumes/{volume_id}", include_in_schema=False)
@router.get("/v3/{project_id}/volumes/{volume_id}", name="show_volume", responses=faults(404))
async def show_volume(
    volume_id: str,
    services: ServicesDep,
    ctx: ContextDep,
    base: BaseUrlDep,
    project_id: ProjectPath = None,
) -> dict[str, Any]:
    _project(ctx, project_id)
    volume = await _volume(services, ctx, volume_id, "volume:get")
    return {"volume": volume_detail(volume, base, is_admin=ctx.is_admin)}


@router.delete("/v3/volumes/{volume_id}", status_code=202, include_in_schema=False)
@router.delete(
    "/v3/{project_id}/volumes/{volume_id}",
    name="delete_volume",
    status_code=202,
    responses=faults(400, 404),
)
async def delete_volume(
    volume_id: str, services: ServicesDep, ctx: ContextDep, project_id: ProjectPath = None
) -> Response:
    _project(ctx, project_id)
    volume = await _volume(services, ctx, volume_id, "volume:delete")
    await _local(services).delete(volume.id)
    return Response(status_code=202)
