"""Routes: flavors (list, detail, show, admin create) and key pairs (import, list, show, delete).

Owns the HTTP side of these resources; records live in the Store.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from rebuildd import errors, schemas, views
from rebuildd.api import BaseUrlDep, ContextDep, ServicesDep, VersionDep, faults, read_json
from rebuildd.models import Flavor, KeyPair, utcnow

router = APIRouter(responses=faults(406))


@router.get(
    "/flavors",
    name="list_flavors",
    tags=["flavors"],
    responses=views.openapi_json(views.FLAVOR_LIST_BODY),
)
async def list_flavors(
    services: ServicesDep, version: VersionDep, base: BaseUrlDep
) -> dict[str, Any]:
    flavors = await services.store.list_flavors()
    return {"flavors": [views.flavor_brief(f, base, version) for f in flavors]}


@router.get(
    "/flavors/detail",
    name="list_flavors_detail",
    tags=["flavors"],
    responses=views.openapi_json(views.FLAVOR_DETAIL_LIST_BODY),
)
async def list_flavors_detail(
    services: ServicesDep, version: VersionDep, base: BaseUrlDep
) -> dict[str, Any]:
    flavors = await services.store.list_flavors()
    return {"flavors": [views.flavor_detail(f, base, version) for f in flavors]}


@router.get(
    "/flavors/{flavor_id}",
    name="show_flavor",
    tags=["flavors"],
    responses={**views.openapi_json(views.FLAVOR_BODY), **faults(404)},
)
async def show_flavor(
    flavor_id: str, services: ServicesDep, version: VersionDep, base: BaseUrlDep
) -> dict[str, Any]:
    flavor = await services.store.get_flavor(flavor_id)
    return {"flavor": views.flavor_detail(flavor, base, version)}


@router.post(
    "/flavors",
    name="create_flavor",
    tags=["flavors"],
    responses={**views.openapi_json(views.FLAVOR_BODY), **faults(403, 409)},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {"flavor": schemas.request_schema(schemas.FlavorCreate)},
                        "required": ["flavor"],
                    }
                }
            },
        }
    },
)
async def create_flavor(
    request: Request, services: ServicesDep, ctx: ContextDep, version: VersionDep, base: BaseUrlDep
) -> dict[str, Any]:
    services.policy.authorize("os_compute_api:os-flavor-manage:create", ctx)
    body = await read_json(request)
    if not isinstance(body, dict) or set(body) != {"flavor"}:
        raise errors.ValidationFailed(
            field="body", value=schemas.show(body), reason="'flavor' is a required property"
        )
    model = schemas.validate(schemas.FlavorCreate, body["flavor"], field="flavor")
    flavor = Flavor(
        id=model.id or _new_flavor_id(),
        name=model.name,
        vcpus=model.vcpus,
        ram=model.ram,
        disk=model.disk,
        ephemeral=model.ephemeral,
        swap=model.swap,
        rxtx_factor=model.rxtx_factor,
        is_public=model.is_public,
        description=model.description,
    )
    await services.store.create_flavor(flavor)
    return {"flavor": views.flavor_detail(flavor, base, version)}


def _new_flavor_id() -> str:
    import uuid

    return str(uuid.uuid4())


# -- key pairs ----------------------------------------------------------------------------------


def fingerprint(public_key: str) -> str:
    """Nova's SSH fingerprint: md5 of the key's base64 body, as colon-separated hex."""
    parts = public_key.strip().split()
    if len(parts) < 2:
        raise errors.Invalid("Keypair data is invalid: failed to generate fingerprint")
    try:
        raw = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise errors.Invalid("Keypair data is invalid: failed to generate fingerprint") from None
    digest = hashlib.md5(raw, usedforsecurity=False).hexdigest()
    return ":".join(digest[i : i + 2] for i in range(0, 32, 2))


@router.post(
    "/os-keypairs",
    name="create_keypair",
    tags=["keypairs"],
    status_code=200,
    responses={
        **views.openapi_json(views.KEYPAIR_BODY),
        201: {
            "description": "Created (2.2 and later)",
            "content": {"application/json": {"schema": views.KEYPAIR_BODY}},
        },
        **faults(409),
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {"keypair": schemas.request_schema(schemas.KeypairCreate)},
                        "required": ["keypair"],
                    }
                }
            },
        }
    },
)
async def create_keypair(
    request: Request, services: ServicesDep, ctx: ContextDep, version: VersionDep
) -> JSONResponse:
    body = await read_json(request)
    if not isinstance(body, dict) or set(body) != {"keypair"}:
        raise errors.ValidationFailed(
            field="body", value=schemas.show(body), reason="'keypair' is a required property"
        )
    model = schemas.validate(schemas.KeypairCreate, body["keypair"], field="keypair")
    keypair = KeyPair(
        name=model.name,
        user_id=model.user_id if (model.user_id and ctx.is_admin) else ctx.user_id,
        public_key=model.public_key,
        fingerprint=fingerprint(model.public_key),
        type=model.type,
        created_at=utcnow(),
    )
    await services.store.create_keypair(keypair)
    view = views.keypair_view(keypair, version)
    view["user_id"] = keypair.user_id
    status = 201 if version.at_least("2.2") else 200
    return JSONResponse({"keypair": view}, status_code=status)


@router.get(
    "/os-keypairs",
    name="list_keypairs",
    tags=["keypairs"],
    responses=views.openapi_json(views.KEYPAIR_LIST_BODY),
)
async def list_keypairs(
    services: ServicesDep, ctx: ContextDep, version: VersionDep
) -> dict[str, Any]:
    keypairs = await services.store.list_keypairs(ctx.user_id)
    return {"keypairs": [{"keypair": views.keypair_view(k, version)} for k in keypairs]}


@router.get(
    "/os-keypairs/{name}",
    name="show_keypair",
    tags=["keypairs"],
    responses={**views.openapi_json(views.KEYPAIR_BODY), **faults(404)},
)
async def show_keypair(
    name: str, services: ServicesDep, ctx: ContextDep, version: VersionDep
) -> dict[str, Any]:
    keypair = await services.store.get_keypair(ctx.user_id, name)
    if keypair is None:
        raise errors.KeypairNotFound(name=name, user_id=ctx.user_id)
    view = views.keypair_view(keypair, version)
    view.update(
        user_id=keypair.user_id, created_at=views.microtime(keypair.created_at), deleted=False, id=0
    )
    return {"keypair": view}


@router.delete(
    "/os-keypairs/{name}",
    name="delete_keypair",
    tags=["keypairs"],
    status_code=202,
    responses={204: {"description": "Deleted (2.2 and later)"}, **faults(404)},
)
async def delete_keypair(
    name: str, services: ServicesDep, ctx: ContextDep, version: VersionDep
) -> Response:
    await services.store.delete_keypair(ctx.user_id, name)
    return Response(status_code=204 if version.at_least("2.2") else 202)
