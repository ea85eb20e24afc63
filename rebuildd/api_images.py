"""Routes: the Glance-compatible local image API at /image, and its read alias under /v2.1/v2
(novaclient looks images up on the compute endpoint).

Owns the HTTP side of the local image store: version document, list (Glance filters and
paging), show, create, update (Glance's JSON patch), upload, download and delete, and
Glance's default policies over them: an image the caller may not see is 404, one it sees but
may not change is 403 (``rebuildd.auth`` holds the rules and the visibility check).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from rebuildd import errors, schemas, views
from rebuildd.api import (
    BaseUrlDep,
    ContextDep,
    LimitQuery,
    ServicesDep,
    faults,
    query_model,
    read_json,
)
from rebuildd.auth import image_visible
from rebuildd.images import LocalImageService
from rebuildd.models import Image, RequestContext
from rebuildd.schemas import parse_json
from rebuildd.storage import ImageFilters

versions = APIRouter(tags=["images"])  # no authentication: clients discover with it
router = APIRouter(tags=["images"])
compute_alias = APIRouter(tags=["images"])

_GLANCE_VERSION = "v2.16"
MAX_LIMIT = 1000


@versions.get("", name="image_versions", include_in_schema=False)
@versions.get("/", name="image_versions_slash", responses=views.openapi_json(views.VERSIONS_BODY))
async def image_versions(base: BaseUrlDep) -> dict[str, Any]:
    return {
        "versions": [
            {
                "id": _GLANCE_VERSION,
                "status": "CURRENT",
                "links": [{"rel": "self", "href": f"{base}/image/v2/"}],
            }
        ]
    }


@dataclass(frozen=True, slots=True)
class ImageQuery:
    """Glance's list filters that rebuildd supports; other query parameters are ignored."""

    name: Annotated[str | None, Query()] = None
    id: Annotated[str | None, Query(description="in:ID,ID,...")] = None
    status: Annotated[str | None, Query()] = None
    visibility: Annotated[str | None, Query()] = None
    limit: LimitQuery = None
    marker: Annotated[str | None, Query()] = None


ImageQueryDep = Annotated[ImageQuery, Depends(query_model(ImageQuery))]


def _image_filters(query: ImageQuery, ctx: RequestContext) -> ImageFilters:
    ids = query.id.removeprefix("in:").split(",") if query.id is not None else None
    return ImageFilters(
        name=query.name,
        ids=ids,
        status=query.status,
        visibility=query.visibility,
        limit=min(query.limit, MAX_LIMIT) if query.limit is not None else None,
        marker=query.marker,
        seen_by=None if ctx.is_admin else ctx.project_id,
    )


async def _list_images(
    query: ImageQuery, services: ServicesDep, ctx: RequestContext
) -> dict[str, Any]:
    services.policy.authorize("get_images", ctx, ctx.project_id)
    filters = _image_filters(query, ctx)
    # Filtered in the store already; again here for the Glance backend's answer.
    images = [i for i in await services.images.list(filters) if image_visible(ctx, i)]
    body: dict[str, Any] = {
        "images": [views.image_view(i) for i in images],
        "first": "/v2/images",
        "schema": "/v2/schemas/images",
    }
    if filters.limit is not None and images and len(images) == filters.limit:
        body["next"] = f"/v2/images?marker={images[-1].id}&limit={filters.limit}"
    return body


async def _visible_image(services: ServicesDep, ctx: RequestContext, image_id: str) -> Image:
    """The image if the caller may see it (``get_image``: a reader, and Glance's visibility),
    else 404 as if there were none: a caller learns nothing of images it cannot see."""
    image = await services.images.get(ctx, image_id)
    if (
        image is None
        or not image_visible(ctx, image)
        or not services.policy.allows("get_image", ctx, image.owner)
    ):
        raise errors.ImageNotFound(image_id=image_id)
    return image


def _authorize_on(services: ServicesDep, rule: str, ctx: RequestContext, image: Image) -> None:
    """Glance's 403 for an image the caller sees but whose owner's rule refuses it."""
    if not services.policy.allows(rule, ctx, image.owner):
        raise errors.Forbidden(f"You are not authorized to complete {rule} action.")


def _authorize_visibility(services: ServicesDep, ctx: RequestContext, visibility: str) -> None:
    """publicize_image (admins only, by default) and communitize_image."""
    rule = {"public": "publicize_image", "community": "communitize_image"}.get(visibility)
    if rule is not None and not services.policy.allows(rule, ctx, ctx.project_id):
        raise errors.Forbidden(f"You are not authorized to complete {rule} action.")


async def _show_image(image_id: str, services: ServicesDep, ctx: ContextDep) -> dict[str, Any]:
    return views.image_view(await _visible_image(services, ctx, image_id))


@router.get("/v2/images", name="list_images", responses=views.openapi_json(views.IMAGE_LIST_BODY))
async def list_images(
    query: ImageQueryDep, services: ServicesDep, ctx: ContextDep
) -> dict[str, Any]:
    return await _list_images(query, services, ctx)


@router.get(
    "/v2/images/{image_id}",
    name="show_image",
    responses={**views.openapi_json(views.IMAGE_BODY), **faults(404)},
)
async def show_image(image_id: str, services: ServicesDep, ctx: ContextDep) -> dict[str, Any]:
    return await _show_image(image_id, services, ctx)


@compute_alias.get("/v2/images", name="list_images_compute_alias", include_in_schema=False)
async def list_images_alias(
    query: ImageQueryDep, services: ServicesDep, ctx: ContextDep
) -> dict[str, Any]:
    return await _list_images(query, services, ctx)


@compute_alias.get(
    "/v2/images/{image_id}", name="show_image_compute_alias", include_in_schema=False
)
async def show_image_alias(image_id: str, services: ServicesDep, ctx: ContextDep) -> dict[str, Any]:
    return await _show_image(image_id, services, ctx)


@router.post(
    "/v2/images",
    name="create_image",
    status_code=201,
    responses={**views.openapi_json(views.IMAGE_BODY, 201), **faults(403, 409)},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": schemas.request_schema(schemas.ImageCreate)}
            },
        }
    },
)
async def create_image(request: Request, services: ServicesDep, ctx: ContextDep) -> JSONResponse:
    body = await read_json(request)
    model = schemas.validate(schemas.ImageCreate, body, field="image")
    if read_only := sorted(schemas.IMAGE_READ_ONLY & set(model.model_extra or {})):
        raise errors.Forbidden(f"Attribute '{read_only[0]}' is read-only.")
    services.policy.authorize("add_image", ctx, ctx.project_id)
    _authorize_visibility(services, ctx, model.visibility)
    fields = model.model_dump(exclude={"tags"})
    image = await services.images.create(ctx, fields)
    return JSONResponse(
        views.image_view(image),
        status_code=201,
        headers={"Location": f"/v2/images/{image.id}"},
    )


@router.put(
    "/v2/images/{image_id}/file",
    name="upload_image",
    status_code=204,
    responses=faults(404, 409),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
        }
    },
)
async def upload_image(
    image_id: str, request: Request, services: ServicesDep, ctx: ContextDep
) -> Response:
    _authorize_on(services, "upload_image", ctx, await _visible_image(services, ctx, image_id))
    await services.images.upload(image_id, request.stream())
    return Response(status_code=204)


@router.get(
    "/v2/images/{image_id}/file",
    name="download_image",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            }
        },
        **faults(404, 409),
    },
)
async def download_image(
    image_id: str, services: ServicesDep, ctx: ContextDep
) -> StreamingResponse:
    image = await _visible_image(services, ctx, image_id)
    _authorize_on(services, "download_image", ctx, image)
    if image.status != "active":
        raise errors.Conflict(f"Image {image_id} has no data.")
    headers = {"Content-MD5": image.checksum or "", "Content-Length": str(image.size or 0)}
    return StreamingResponse(
        services.images.read(image_id), media_type="application/octet-stream", headers=headers
    )


@router.delete(
    "/v2/images/{image_id}", name="delete_image", status_code=204, responses=faults(403, 404)
)
async def delete_image(image_id: str, services: ServicesDep, ctx: ContextDep) -> Response:
    _authorize_on(services, "delete_image", ctx, await _visible_image(services, ctx, image_id))
    await services.images.delete(image_id)
    return Response(status_code=204)


# -- update: Glance's JSON patch (application/openstack-images-v2.1-json-patch) -------------------

PATCH_MEDIA_TYPE = "application/openstack-images-v2.1-json-patch"
# What a patch may change (with custom properties); the rest of the image is Glance's to keep.
_CORE = frozenset(
    {"name", "visibility", "protected", "min_disk", "min_ram", "disk_format", "container_format"}
)
_QUEUED_ONLY = frozenset({"disk_format", "container_format"})


def _user_fields(image: Image) -> dict[str, Any]:
    """An image's user-settable fields, as POST /v2/images takes them."""
    return {
        **image.properties,
        "name": image.name,
        "visibility": image.visibility,
        "protected": image.protected,
        "min_disk": image.min_disk,
        "min_ram": image.min_ram,
        "disk_format": image.disk_format,
        "container_format": image.container_format,
    }


def _patch_name(path: Any) -> str:
    """The attribute a JSON pointer names: one level (``/name``, ``/hw_disk_bus``)."""
    if not isinstance(path, str) or not path.startswith("/") or path.count("/") != 1:
        raise errors.Invalid(f"Invalid JSON pointer for this resource: '{path}'")
    name = path[1:].replace("~1", "/").replace("~0", "~")
    if not name:
        raise errors.Invalid(f"Invalid JSON pointer for this resource: '{path}'")
    return name


def apply_patch(image: Image, operations: Any) -> dict[str, Any]:
    """The image's user-settable fields after ``operations`` (add, replace, remove), or the
    error Glance answers: 400 for a malformed patch, 403 for a read-only attribute."""
    if not isinstance(operations, list):
        raise errors.Invalid("Request body must be a JSON array of operation objects.")
    fields = _user_fields(image)
    for operation in operations:
        if not isinstance(operation, dict) or "path" not in operation:
            raise errors.Invalid("Operation objects must contain 'op' and 'path'.")
        op = operation.get("op")
        name = _patch_name(operation["path"])
        if name in schemas.IMAGE_READ_ONLY or name in ("id", "tags"):
            raise errors.Forbidden(f"Attribute '{name}' is read-only.")
        if name in _QUEUED_ONLY and image.status != "queued":
            raise errors.Forbidden(f"Attribute {name} can be only replaced for a queued image.")
        if op in ("add", "replace"):
            if "value" not in operation:
                raise errors.Invalid(f"Operation '{op}' requires a member named 'value'.")
            if op == "replace" and name not in fields:
                raise errors.Conflict(f"Property {name} does not exist.")
            fields[name] = operation["value"]
        elif op == "remove":
            if name in _CORE:
                raise errors.Forbidden(f"Attribute '{name}' is reserved and cannot be removed.")
            if fields.pop(name, None) is None:
                raise errors.Conflict(f"Property {name} does not exist.")
        else:
            raise errors.Invalid(f"Operation '{op}' is not supported; use add, replace or remove.")
    return fields


@router.patch(
    "/v2/images/{image_id}",
    name="update_image",
    responses={**views.openapi_json(views.IMAGE_BODY), **faults(403, 404, 409)},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                PATCH_MEDIA_TYPE: {"schema": {"type": "array", "items": {"type": "object"}}}
            },
        }
    },
)
async def update_image(
    image_id: str, request: Request, services: ServicesDep, ctx: ContextDep
) -> dict[str, Any]:
    """Glance's image update: the owner's members and admins change an image (``modify_image``),
    only admins make it public (``publicize_image``); ``protected`` is changed back here."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != PATCH_MEDIA_TYPE:
        raise errors.UnsupportedMediaType(
            media_type=media_type or "none", supported=PATCH_MEDIA_TYPE
        )
    image = await _visible_image(services, ctx, image_id)
    _authorize_on(services, "modify_image", ctx, image)
    if not isinstance(services.images, LocalImageService):
        raise errors.Forbidden(
            "rebuildd's image API is read-only with REBUILDD_IMAGE_BACKEND=glance."
        )
    fields = apply_patch(image, parse_json(await request.body()))
    # The result must be an image POST /v2/images would have taken.
    model = schemas.validate(schemas.ImageCreate, fields, field="image")
    if fields.get("visibility") != image.visibility:
        _authorize_visibility(services, ctx, model.visibility)
    core = model.model_dump(include=set(_CORE))
    updated = await services.store.update_image(
        image_id, **core, properties=dict(model.model_extra or {})
    )
    return views.image_view(updated)
