"""Routes: version documents, servers (list, detail, show, create, delete) and server actions
(rebuild, os-stop, os-start, lock, unlock, os-resetState). Instance actions are in api_actions.py.

Owns the HTTP side of these resources: parse, call the pipeline or the Store, render a view.
Errors are raised as rebuildd errors and rendered by api.py's one handler.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse

from rebuildd import boot_volumes, errors, lifecycle, microversion, pipeline, schemas, views
from rebuildd.api import (
    BaseUrlDep,
    CallDep,
    ContextDep,
    LimitQuery,
    ServicesDep,
    VersionDep,
    faults,
    query_model,
    read_json,
)
from rebuildd.microversion import Version
from rebuildd.models import BlockDevice, RequestContext
from rebuildd.rebuild_checks import METADATA_ITEMS
from rebuildd.states import states_for_status
from rebuildd.storage import ServerFilters

versions = APIRouter(tags=["versions"])
router = APIRouter(tags=["servers"], responses=faults(406))

MAX_LIMIT = 1000
_UPDATED = "2013-07-23T11:33:21Z"


def _version_doc(base: str) -> dict[str, Any]:
    return {
        "id": "v2.1",
        "status": "CURRENT",
        "version": str(microversion.MAX_VERSION),
        "min_version": str(microversion.MIN_VERSION),
        "updated": _UPDATED,
        "links": [{"rel": "self", "href": f"{base}/v2.1/"}],
    }


@versions.get("/", name="list_versions", responses=views.openapi_json(views.VERSIONS_BODY))
async def list_versions(base: BaseUrlDep) -> dict[str, Any]:
    return {"versions": [_version_doc(base)]}


@versions.get("/v2.1", name="show_version", include_in_schema=False)
@versions.get(
    "/v2.1/",
    name="show_version_v21",
    responses={**views.openapi_json(views.VERSION_BODY), **faults(406)},
)
async def show_version(base: BaseUrlDep) -> dict[str, Any]:
    doc = _version_doc(base)
    doc["links"].append(
        {"rel": "describedby", "type": "text/html", "href": "https://docs.openstack.org/"}
    )
    doc["media-types"] = [
        {"base": "application/json", "type": "application/vnd.openstack.compute+json;version=2.1"}
    ]
    return {"version": doc}


# -- servers ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerQuery:
    """The ``GET /servers`` filters Nova documents; other query parameters are ignored."""

    name: Annotated[str | None, Query(description="A regular expression")] = None
    status: Annotated[str | None, Query()] = None
    image: Annotated[str | None, Query()] = None
    flavor: Annotated[str | None, Query()] = None
    changes_since: Annotated[
        str | None, Query(alias="changes-since", json_schema_extra={"format": "date-time"})
    ] = None
    limit: LimitQuery = None
    marker: Annotated[str | None, Query()] = None
    all_tenants: Annotated[str | None, Query()] = None


ServerQueryDep = Annotated[ServerQuery, Depends(query_model(ServerQuery))]


def _filters(query: ServerQuery, *, is_admin: bool, project_id: str) -> ServerFilters:
    all_tenants = (query.all_tenants or "").lower() not in {"", "0", "false", "off", "no"}
    since = _changes_since(query.changes_since) if query.changes_since is not None else None
    return ServerFilters(
        project_id=None if (is_admin and all_tenants) else project_id,
        name=query.name or None,
        image=query.image or None,
        flavor=query.flavor or None,
        states=states_for_status(query.status.upper()) if query.status else None,
        changes_since=since,
        limit=min(query.limit, MAX_LIMIT) if query.limit is not None else MAX_LIMIT,
        marker=query.marker or None,
    )


def _changes_since(value: str) -> dt.datetime:
    """An ISO 8601 time (Nova's ``date-time``; not a bare number), naive taken as UTC."""
    try:
        since = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        return since.astimezone(dt.UTC) if since.tzinfo else since.replace(tzinfo=dt.UTC)
    except (ValueError, OverflowError):
        raise errors.Invalid(
            f"Invalid input for query parameters changes-since. Value: {value!r}. "
            "It is not an ISO 8601 date-time in range."
        ) from None


def _next_links(
    base: str, path: str, items: list[Any], limit: int | None, request: Request
) -> list[dict[str, str]]:
    if not items or limit is None or len(items) < limit:
        return []
    query = {k: v for k, v in request.query_params.items() if k != "marker"}
    query["marker"] = items[-1].id
    # Encoded: a filter value holding '&', '#' or spaces must not change the next link's query.
    return [{"rel": "next", "href": f"{base}{path}?{urlencode(query)}"}]


@router.get("/servers", name="list_servers", responses=views.openapi_json(views.SERVER_LIST_BODY))
async def list_servers(
    request: Request,
    query: ServerQueryDep,
    services: ServicesDep,
    ctx: ContextDep,
    base: BaseUrlDep,
) -> dict[str, Any]:
    services.policy.authorize("os_compute_api:servers:index", ctx, ctx.project_id)
    filters = _filters(query, is_admin=ctx.is_admin, project_id=ctx.project_id)
    servers = await services.store.list_servers(filters)
    body: dict[str, Any] = {"servers": [views.server_brief(s, base) for s in servers]}
    if links := _next_links(
        base,
        "/v2.1/servers",
        servers,
        filters.limit if "limit" in request.query_params else None,
        request,
    ):
        body["servers_links"] = links
    return body


@router.get(
    "/servers/detail",
    name="list_servers_detail",
    responses=views.openapi_json(views.SERVER_DETAIL_LIST_BODY),
)
async def list_servers_detail(
    request: Request,
    query: ServerQueryDep,
    services: ServicesDep,
    ctx: ContextDep,
    version: VersionDep,
    base: BaseUrlDep,
) -> dict[str, Any]:
    services.policy.authorize("os_compute_api:servers:detail", ctx, ctx.project_id)
    filters = _filters(query, is_admin=ctx.is_admin, project_id=ctx.project_id)
    servers = await services.store.list_servers(filters)
    latest = await services.store.latest_faults([s.id for s in servers if s.vm_state == "error"])
    # One query for every listed server's volumes, not one per server.
    volumes = await services.volume_store.volume_devices([s.id for s in servers])
    body: dict[str, Any] = {
        "servers": [
            views.server_detail(
                s,
                base,
                version,
                latest.get(s.id),
                is_admin=ctx.is_admin,
                volumes=volumes.get(s.id, ()),
            )
            for s in servers
        ]
    }
    if links := _next_links(
        base,
        "/v2.1/servers/detail",
        servers,
        filters.limit if "limit" in request.query_params else None,
        request,
    ):
        body["servers_links"] = links
    return body


@router.get(
    "/servers/{server_id}",
    name="show_server",
    responses={**views.openapi_json(views.SERVER_BODY), **faults(404)},
)
async def show_server(server_id: str, call: CallDep) -> dict[str, Any]:
    ctx, services = call.context, call.services
    store = services.store
    server = await store.get_server(server_id, project_id=None if ctx.is_admin else ctx.project_id)
    services.policy.authorize("os_compute_api:servers:show", ctx, server.project_id)
    latest = await store.latest_faults([server.id] if server.vm_state == "error" else [])
    volumes = await services.volume_store.volume_devices([server.id])
    return {
        "server": views.server_show(
            server,
            call.base,
            call.version,
            latest.get(server.id),
            is_admin=ctx.is_admin,
            volumes=volumes.get(server.id, ()),
        )
    }


@router.post(
    "/servers",
    name="create_server",
    status_code=202,
    responses=views.openapi_json(views.CREATED_SERVER_BODY, 202),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {"server": schemas.request_schema(schemas.CreateServerV294)},
                        "required": ["server"],
                    }
                }
            },
        }
    },
)
async def create_server(
    request: Request, services: ServicesDep, ctx: ContextDep, version: VersionDep, base: BaseUrlDep
) -> JSONResponse:
    body = await read_json(request)
    if not isinstance(body, dict) or "server" not in body:
        raise errors.ValidationFailed(
            field="server", value=schemas.show(body), reason="'server' is a required property"
        )
    unknown = set(body) - {"server", "os:scheduler_hints", "OS-SCH-HNT:scheduler_hints"}
    if unknown:
        raise errors.ValidationFailed(
            field="body",
            value=schemas.show(body),
            reason=f"Additional properties are not allowed ('{sorted(unknown)[0]}' was unexpected)",
        )
    model = schemas.validate(schemas.create_model(version), body["server"], field="server")
    if model.metadata is not None and len(model.metadata) > METADATA_ITEMS:  # Nova's quota
        raise errors.MetadataLimitExceeded(allowed=METADATA_ITEMS)
    block_devices = _block_devices(model.block_device_mapping_v2 or [], model.imageRef)
    if services.volumes is not None:  # local volumes: their limit, before the job makes them
        for mapping in block_devices:
            if mapping.volume_size is not None:
                services.volumes.check_size(mapping.volume_size)
    spec = lifecycle.CreateSpec(
        name=model.name,
        image_ref=model.imageRef or "",
        block_devices=block_devices,
        flavor_ref=model.flavorRef,
        admin_pass=model.adminPass,
        metadata=dict(model.metadata or {}),
        key_name=model.key_name,
        user_data=model.user_data,
        description=getattr(model, "description", None)
        if "description" in model.model_fields_set
        else pipeline.UNSET,
        access_ip_v4=model.accessIPv4 or "",
        access_ip_v6=model.accessIPv6 or "",
        auto_disk_config=model.diskConfig == "AUTO",
        config_drive=bool(model.config_drive),
        trusted_certs=_trusted_certs(model),
        hostname=getattr(model, "hostname", None),
    )
    server, admin_pass = await lifecycle.request_create(services.deps, services.domain, ctx, spec)
    view = {
        "id": server.id,
        "links": views.server_brief(server, base)["links"],
        "OS-DCF:diskConfig": "AUTO" if server.auto_disk_config else "MANUAL",
        "security_groups": [{"name": "default"}],
        "adminPass": admin_pass,
    }
    location = f"{base}/v2.1/servers/{server.id}"
    return JSONResponse({"server": view}, status_code=202, headers={"Location": location})


def _block_devices(
    entries: list[schemas.BlockDeviceMappingV2], image_ref: str | None
) -> tuple[boot_volumes.Mapping, ...]:
    """The volume entries of ``block_device_mapping_v2`` (a local image root that repeats
    ``imageRef`` is the image boot itself); other kinds are a clear 400."""
    found = []
    for entry in entries:
        destination = entry.destination_type or ("volume" if entry.source_type == "volume"
                                                  else "local")  # fmt: skip
        is_image_boot = entry.source_type == "image" and destination == "local"
        if is_image_boot and entry.boot_index == 0 and entry.uuid in (None, image_ref):
            continue  # the image boot imageRef asks for anyway
        if (entry.source_type, destination) not in (("image", "volume"), ("volume", "volume")):
            raise errors.InvalidBDM(
                reason=f"rebuildd boots from volumes made from images and from existing "
                f"volumes only, not source_type {entry.source_type} with destination_type "
                f"{destination}."
            )
        if entry.uuid is None:
            raise errors.InvalidBDM(reason=f"a {entry.source_type} mapping needs a uuid.")
        found.append(
            boot_volumes.Mapping(
                source_type=entry.source_type,
                destination_type=destination,
                uuid=entry.uuid,
                boot_index=None if entry.boot_index in (None, -1) else entry.boot_index,
                volume_size=entry.volume_size,
                delete_on_termination=entry.delete_on_termination,
                device_name=entry.device_name,
                tag=entry.tag,
            )
        )
    return tuple(found)


@router.delete(
    "/servers/{server_id}", name="delete_server", status_code=204, responses=faults(404, 409)
)
async def delete_server(server_id: str, services: ServicesDep, ctx: ContextDep) -> Response:
    await lifecycle.request_delete(services.deps, ctx, server_id)
    return Response(status_code=204)


# -- actions ------------------------------------------------------------------------------------

_ACTIONS = ("rebuild", "os-stop", "os-start")


@router.post(
    "/servers/{server_id}/action",
    name="server_action",
    status_code=202,
    response_class=Response,
    responses={
        202: {
            "description": 'Accepted. A rebuild answers {"server": {...}} (JSON) with the new '
            "adminPass; os-stop and os-start answer with no body, as Nova does."
        },
        **faults(404, 409),
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "oneOf": [
                            {
                                "type": "object",
                                "properties": {
                                    "rebuild": schemas.request_schema(schemas.RebuildV294)
                                },
                                "required": ["rebuild"],
                                "additionalProperties": False,
                            },
                            {
                                "type": "object",
                                "properties": {"os-stop": {"type": "null"}},
                                "required": ["os-stop"],
                                "additionalProperties": False,
                            },
                            {
                                "type": "object",
                                "properties": {"os-start": {"type": "null"}},
                                "required": ["os-start"],
                                "additionalProperties": False,
                            },
                            {
                                "type": "object",
                                "properties": {
                                    "lock": {
                                        "oneOf": [
                                            {"type": "null"},
                                            schemas.request_schema(schemas.LockBody),
                                        ]
                                    }
                                },
                                "required": ["lock"],
                                "additionalProperties": False,
                            },
                            {
                                "type": "object",
                                "properties": {"unlock": {"type": "null"}},
                                "required": ["unlock"],
                                "additionalProperties": False,
                            },
                            {
                                "type": "object",
                                "properties": {
                                    "os-resetState": schemas.request_schema(schemas.ResetStateBody)
                                },
                                "required": ["os-resetState"],
                                "additionalProperties": False,
                            },
                        ]
                    }
                }
            },
        }
    },
)
async def server_action(server_id: str, request: Request, call: CallDep) -> Response:
    services, ctx, version, base = call.services, call.context, call.version, call.base
    body = await read_json(request)
    if not isinstance(body, dict) or len(body) != 1:
        raise errors.MalformedBody()
    ((action, value),) = body.items()
    if action in ("os-stop", "os-start") and value is not None:
        raise errors.ValidationFailed(
            field=action,
            value=schemas.show(value),
            reason=f"{schemas.show(value)} is not of type 'null'",
        )
    if action == "rebuild":
        key = _idempotency_key(request, ctx)
        if key is not None and (replay := await _replay(services, ctx, server_id, key)):
            return replay
        try:
            return await _rebuild(server_id, value, services, ctx, version, base, key)
        except errors.Conflict:
            # A concurrent request with the same key won the race: answer as it did.
            if key is not None and (replay := await _replay(services, ctx, server_id, key)):
                return replay
            raise
    if action in ("lock", "unlock"):
        reason = _lock_reason(action, value, version)
        await lifecycle.request_lock(
            services.deps, ctx, server_id, locked=action == "lock", reason=reason
        )
        return Response(status_code=202)
    if action == "os-resetState":
        reset = schemas.validate(schemas.ResetStateBody, value, field=action)
        await lifecycle.request_reset_state(services.deps, ctx, server_id, reset.state)
        return Response(status_code=202)
    if action in ("os-stop", "os-start"):
        await lifecycle.request_power_action(
            services.deps, ctx, server_id, action.removeprefix("os-")
        )
        return Response(status_code=202)
    raise errors.NoSuchAction(action=action)


async def _rebuild(
    server_id: str,
    value: Any,
    services: ServicesDep,
    ctx: ContextDep,
    version: VersionDep,
    base: str,
    idempotency_key: str | None = None,
) -> JSONResponse:
    model = schemas.validate(schemas.rebuild_model(version), value, field="rebuild")
    fields = model.model_fields_set
    spec = pipeline.RebuildSpec(
        image_ref=model.imageRef,
        name=model.name,
        admin_pass=model.adminPass,
        metadata=dict(model.metadata) if model.metadata is not None else None,
        preserve_ephemeral=bool(model.preserve_ephemeral),
        auto_disk_config=None if model.diskConfig is None else model.diskConfig == "AUTO",
        access_ip_v4=model.accessIPv4,
        access_ip_v6=model.accessIPv6,
        description=getattr(model, "description", None)
        if "description" in fields
        else pipeline.UNSET,
        key_name=getattr(model, "key_name", None) if "key_name" in fields else pipeline.UNSET,
        personality=tuple((p.path, p.contents) for p in getattr(model, "personality", None) or ()),
        user_data=getattr(model, "user_data", None) if "user_data" in fields else pipeline.UNSET,
        hostname=getattr(model, "hostname", None),
        trusted_certs=_trusted_certs(model)
        if "trusted_image_certificates" in fields
        else (pipeline.UNSET),
        reimage_boot_volume=version.at_least("2.93"),
    )
    server, admin_pass = await pipeline.request_rebuild(
        services.deps, ctx, server_id, spec, idempotency_key=idempotency_key
    )
    volumes: Sequence[BlockDevice] = ()
    if version.at_least("2.75"):  # the full view lists the attached volumes
        volumes = (await services.volume_store.volume_devices([server.id])).get(server.id, ())
    view = views.server_rebuilt(server, base, version, is_admin=ctx.is_admin, volumes=volumes)
    view["adminPass"] = admin_pass
    location = f"{base}/v2.1/servers/{server.id}"
    if idempotency_key is not None:
        answer = {"body": {"server": view}, "location": location}
        await services.store.save_response(ctx.request_id, answer)
    return JSONResponse({"server": view}, status_code=202, headers={"Location": location})


def _trusted_certs(model: Any) -> tuple[str, ...] | None:
    certs = getattr(model, "trusted_image_certificates", None)
    return None if certs is None else tuple(certs)


def _lock_reason(action: str, value: Any, version: Version) -> str | None:
    """``{"lock": null}``; from 2.73 also ``{"lock": {"locked_reason": "..."}}``."""
    if value is None:
        return None
    if action == "lock" and version.at_least("2.73") and isinstance(value, dict):
        model = schemas.validate(schemas.LockBody, value, field="lock")
        return model.locked_reason
    shown = schemas.show(value)
    raise errors.ValidationFailed(
        field=action, value=shown, reason=f"{shown} is not of type 'null'"
    )


# -- idempotent rebuilds --------------------------------------------------------------------------

_REQUEST_ID = re.compile(r"^req-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_REPLAY_WAIT = 5.0


def _idempotency_key(request: Request, ctx: RequestContext) -> str | None:
    """``X-Idempotency-Key``, else a client-chosen ``X-OpenStack-Request-ID`` (req-<uuid>),
    scoped by the caller's project and user: stored as a digest of the three, so another
    user's same key is another key and never replays this user's answer (its adminPass)."""
    key = request.headers.get("x-idempotency-key")
    if key is not None:
        key = key.strip()
        if not 1 <= len(key) <= 255:
            raise errors.Invalid("X-Idempotency-Key must be 1 to 255 characters long")
    else:
        request_id = request.headers.get("x-openstack-request-id", "").strip()
        if not _REQUEST_ID.match(request_id):
            return None
        key = request_id
    scoped = json.dumps([ctx.project_id, ctx.user_id, key]).encode()
    return "sha256:" + hashlib.sha256(scoped).hexdigest()


async def _replay(
    services: ServicesDep, ctx: ContextDep, server_id: str, key: str
) -> JSONResponse | None:
    """The first answer to this key for this server, if there was one (waiting briefly while
    the request that got it is still writing it). The caller must pass the rebuild's policy
    now, as a new rebuild would, and be the user that made the first one."""
    project = None if ctx.is_admin else ctx.project_id
    server = await services.store.get_server(server_id, project_id=project, include_deleted=True)
    services.policy.authorize("os_compute_api:servers:rebuild", ctx, server.project_id)
    deadline = time.monotonic() + _REPLAY_WAIT
    while True:
        action = await services.store.find_action_by_key(server_id, key)
        if action is None:
            return None
        if (action.user_id, action.project_id) != (ctx.user_id, ctx.project_id):
            return None
        if action.response is not None:
            headers = {"Location": action.response["location"]}
            return JSONResponse(action.response["body"], status_code=202, headers=headers)
        if time.monotonic() > deadline:
            raise errors.Conflict(f"A rebuild with idempotency key {key} is still being accepted.")
        await asyncio.sleep(0.02)
