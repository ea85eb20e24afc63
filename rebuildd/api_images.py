"""Routes: the Glance-compatible local image API at /image, and its read alias under /v2.1/v2
(novaclient looks images up on the compute endpoint).

Owns the HTTP side of the local image store: version document, list (Glance filters and
paging), show, create, upload, download and delete.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from rebuildd import errors, schemas, views
from rebuildd.api import BaseUrlDep, ContextDep, ServicesDep, read_json
from rebuildd.storage import ImageFilters

router = APIRouter(tags=["images"])
compute_alias = APIRouter(tags=["images"])

_GLANCE_VERSION = "v2.16"
MAX_LIMIT = 1000


@router.get("", name="image_versions", include_in_schema=False)
@router.get("/", name="image_versions_slash")
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


def _image_filters(request: Request) -> ImageFilters:
    params = request.query_params
    ids = None
    if (id_filter := params.get("id")) is not None:
        ids = id_filter.removeprefix("in:").split(",")
    try:
        limit = min(int(params["limit"]), MAX_LIMIT) if "limit" in params else None
    except ValueError:
        raise errors.Invalid("limit param must be an integer") from None
    if limit is not None and limit < 0:
        raise errors.Invalid("limit param must be positive")
    return ImageFilters(
        name=params.get("name"),
        ids=ids,
        status=params.get("status"),
        visibility=params.get("visibility"),
        limit=limit,
        marker=params.get("marker"),
    )


async def _list_images(request: Request, services: ServicesDep) -> dict[str, Any]:
    filters = _image_filters(request)
    images = await services.images.list(filters)
    body: dict[str, Any] = {
        "images": [views.image_view(i) for i in images],
        "first": "/v2/images",
        "schema": "/v2/schemas/images",
    }
    if filters.limit is not None and images and len(images) == filters.limit:
        body["next"] = f"/v2/images?marker={images[-1].id}&limit={filters.limit}"
    return body


async def _show_image(image_id: str, services: ServicesDep, ctx: ContextDep) -> dict[str, Any]:
    image = await services.images.get(ctx, image_id)
    if image is None:
        raise errors.ImageNotFound(image_id=image_id)
    return views.image_view(image)


@router.get("/v2/images", name="list_images")
async def list_images(request: Request, services: ServicesDep) -> dict[str, Any]:
    return await _list_images(request, services)


@router.get("/v2/images/{image_id}", name="show_image")
async def show_image(image_id: str, services: ServicesDep, ctx: ContextDep) -> dict[str, Any]:
    return await _show_image(image_id, services, ctx)


@compute_alias.get("/v2/images", name="list_images_compute_alias", include_in_schema=False)
async def list_images_alias(request: Request, services: ServicesDep) -> dict[str, Any]:
    return await _list_images(request, services)


@compute_alias.get(
    "/v2/images/{image_id}", name="show_image_compute_alias", include_in_schema=False
)
async def show_image_alias(image_id: str, services: ServicesDep, ctx: ContextDep) -> dict[str, Any]:
    return await _show_image(image_id, services, ctx)


@router.post(
    "/v2/images",
    name="create_image",
    status_code=201,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": schemas.ImageCreate.model_json_schema()}},
        }
    },
)
async def create_image(request: Request, services: ServicesDep, ctx: ContextDep) -> JSONResponse:
    body = await read_json(request)
    model = schemas.validate(schemas.ImageCreate, body, field="image")
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
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
        }
    },
)
async def upload_image(image_id: str, request: Request, services: ServicesDep) -> Response:
    await services.images.upload(image_id, request.stream())
    return Response(status_code=204)


@router.get("/v2/images/{image_id}/file", name="download_image")
async def download_image(
    image_id: str, services: ServicesDep, ctx: ContextDep
) -> StreamingResponse:
    image = await services.images.get(ctx, image_id)
    if image is None:
        raise errors.ImageNotFound(image_id=image_id)
    if image.status != "active":
        raise errors.Conflict(f"Image {image_id} has no data.")
    headers = {"Content-MD5": image.checksum or "", "Content-Length": str(image.size or 0)}
    return StreamingResponse(
        services.images.read(image_id), media_type="application/octet-stream", headers=headers
    )


@router.delete("/v2/images/{image_id}", name="delete_image", status_code=204)
async def delete_image(image_id: str, services: ServicesDep) -> Response:
    await services.images.delete(image_id)
    return Response(status_code=204)
