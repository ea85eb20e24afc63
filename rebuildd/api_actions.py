"""Routes: instance actions, ``GET /servers/{id}/os-instance-actions[/{request_id}]``, with
Nova's microversion behaviour (2.21 deleted servers, 2.51 events for owners, 2.58 paging and
changes-since, 2.62 host and hostId, 2.66 changes-before, 2.84 event details).

Owns the HTTP side of instance actions: parse, read the Store, render a view.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request

from rebuildd import errors, views
from rebuildd.api import BaseUrlDep, ContextDep, Services, ServicesDep, VersionDep, faults
from rebuildd.microversion import Version
from rebuildd.models import InstanceAction, RequestContext, Server

router = APIRouter(tags=["servers"], responses=faults(406))

MAX_LIMIT = 1000


async def _server(
    services: Services, ctx: RequestContext, version: Version, server_id: str, rule: str
) -> Server:
    """The caller's server (any project's for an admin); from 2.21 a deleted one too; if
    Nova's ``os-instance-actions`` rule (PROJECT_READER_OR_ADMIN) lets it read."""
    project = None if ctx.is_admin else ctx.project_id
    server = await services.store.get_server(
        server_id, project_id=project, include_deleted=version.at_least("2.21")
    )
    services.policy.authorize(f"os_compute_api:os-instance-actions:{rule}", ctx, server.project_id)
    return server


@router.get(
    "/servers/{server_id}/os-instance-actions",
    name="list_instance_actions",
    responses={**views.openapi_json(views.ACTION_LIST_BODY), **faults(404)},
)
async def list_instance_actions(
    server_id: str,
    request: Request,
    services: ServicesDep,
    ctx: ContextDep,
    version: VersionDep,
    base: BaseUrlDep,
) -> dict[str, Any]:
    """Newest first; deleted servers' actions from 2.21; paging and time filters from 2.58."""
    server = await _server(services, ctx, version, server_id, "list")
    actions = await services.store.list_actions(server.id)
    limit = None
    if version.at_least("2.58"):
        actions, limit = _page_actions(actions, request.query_params, version)
    body: dict[str, Any] = {"instanceActions": [views.action_view(a, version) for a in actions]}
    if limit is not None and actions and len(actions) == limit:
        query = urlencode({"limit": limit, "marker": actions[-1].request_id})
        href = f"{base}/v2.1/servers/{server.id}/os-instance-actions?{query}"
        body["links"] = [{"rel": "next", "href": href}]
    return body


def _page_actions(
    actions: list[InstanceAction], params: Any, version: Version
) -> tuple[list[InstanceAction], int | None]:
    def when(name: str) -> dt.datetime | None:
        raw = params.get(name)
        if raw is None:
            return None
        try:
            value = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
        except ValueError:
            raise errors.Invalid(f"Invalid input for query parameters {name}.") from None
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)

    since = when("changes-since")
    before = when("changes-before") if version.at_least("2.66") else None
    if since and before and before < since:
        raise errors.Invalid(
            "The value of changes-since must be less than or equal to changes-before."
        )
    if since is not None:
        actions = [a for a in actions if a.updated_at >= since]
    if before is not None:
        actions = [a for a in actions if a.updated_at <= before]
    if (marker := params.get("marker")) is not None:
        ids = [a.request_id for a in actions]
        if marker not in ids:
            raise errors.Invalid(f"Marker {marker} could not be found.")
        actions = actions[ids.index(marker) + 1 :]
    limit = None
    if (raw_limit := params.get("limit")) is not None:
        if not re.fullmatch(r"[0-9]+", raw_limit):
            raise errors.Invalid("Invalid input for query parameters limit.")
        # Digits beyond MAX_LIMIT's are capped unread: int() of thousands of them is an error.
        limit = min(int(raw_limit), MAX_LIMIT) if len(raw_limit) <= 9 else MAX_LIMIT
        actions = actions[:limit]
    return actions, limit


@router.get(
    "/servers/{server_id}/os-instance-actions/{request_id}",
    name="show_instance_action",
    responses={**views.openapi_json(views.ACTION_BODY), **faults(404)},
)
async def show_instance_action(
    server_id: str,
    request_id: str,
    services: ServicesDep,
    ctx: ContextDep,
    version: VersionDep,
) -> dict[str, Any]:
    server = await _server(services, ctx, version, server_id, "show")
    action = await services.store.get_action(server.id, request_id)
    # Events: all of them for whom the events rule allows; from 2.51 everyone else sees them
    # without traceback and host (Nova's rules).
    policy = services.policy
    if policy.allows("os_compute_api:os-instance-actions:events", ctx, server.project_id):
        events = "full"
    else:
        events = "public" if version.at_least("2.51") else "none"
    details = policy.allows(
        "os_compute_api:os-instance-actions:events:details", ctx, server.project_id
    )
    view = views.action_view(action, version, events=events, show_details=details)
    return {"instanceAction": view}
