"""Routes: the Glance-compatible local image API at /image, and its read alias under /v2.1/v2
(novaclient looks images up on the compute endpoint).

Owns the HTTP side of the local image store: version document, list (Glance filters and
paging), show, create, upload, download and delete.
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


def _image_filters(query: ImageQuery) -> ImageFilters:
    ids = query.id.removeprefix("in:").split(",") if query.id is not None else None
    return ImageFilters(
        name=query.name,
        ids=ids,
        status=query.status,
        visibility=query.visibility,
        limit=min(query.limit, MAX_LIMIT) if query.limit is not None else None,
        marker=query.marker,
    )


async def _list_images(query: ImageQuery, services: ServicesDep) -> dict[str, Any]:
    filters = _image_filters(query)
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


@router.get("/v2/images", name="list_images", responses=views.openapi_json(views.IMAGE_LIST_BODY))
async def list_images(query: ImageQueryDep, services: ServicesDep) -> dict[str, Any]:
    return await _list_images(query, services)


@router.get(
    "/v2/images/{image_id}",
    name="show_image",
    responses={**views.openapi_json(views.IMAGE_BODY), **faults(404)},
)
async def show_image(image_id: str, services: ServicesDep, ctx: ContextDep) -> dict[str, Any]:
    return await _show_image(image_id, services, ctx)


@compute_alias.get("/v2/images", name="list_images_compute_alias", include_in_schema=False)
async def list_images_alias(query: ImageQueryDep, services: ServicesDep) -> dict[str, Any]:
    return await _list_images(query, services)


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
async def upload_image(image_id: str, request: Request, services: ServicesDep) -> Response:
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
    image = await services.images.get(ctx, image_id)
    if image is None:
        raise errors.ImageNotFound(image_id=image_id)
    if image.status != "active":
        raise errors.Conflict(f"Image {image_id} has no data.")
    headers = {"Content-MD5": image.checksum or "", "Content-Length": str(image.size or 0)}
    return StreamingResponse(
        services.images.read(image_id), media_type="application/octet-stream", headers=headers
    )


@router.delete(
    "/v2/images/{image_id}", name="delete_image", status_code=204, responses=faults(403, 404)
)
async def delete_image(image_id: str, services: ServicesDep) -> Response:
    await services.images.delete(image_id)
    return Response(status_code=204)
