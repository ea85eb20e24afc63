"""Route: Nova's ``POST /v2.1/os-server-external-events``, where Cinder, Neutron and other
services tell the compute service that something happened to a server (a re-image finished, a
port was plugged). Admin or ``service`` role only (Nova's
``os_compute_api:os-server-external-events:create``).

Owns the HTTP side, as Nova answers it: the body is checked per microversion (which event
names each admits), every event is echoed with its ``code`` (200 accepted, 404 no such server,
400 ``volume-extended`` without a tag) and ``status``, and the answer is 200 when all were
accepted, else 207 — also when none was (Nova dropped its 404 for that in Ussuri, bug
1855752). Accepted events are recorded as one finished instance action ``external_events``
per server, one action event per external event, and handed to the in-process waiters
(:class:`rebuildd.instance_events.InstanceEvents`). It does not act on an event itself.
"""

from __future__ import annotations

import contextlib
import uuid
from typing import Any, Final

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from rebuildd import errors, schemas, views
from rebuildd.api import ContextDep, Services, ServicesDep, VersionDep, faults, read_json
from rebuildd.instance_events import EVENT_NAMES, Event
from rebuildd.microversion import Version
from rebuildd.models import ActionEvent, NewAction, RequestContext, utcnow

router = APIRouter(tags=["servers"], responses=faults(406))

ACTION: Final = "external_events"
_RESULTS: Final = {"completed": "Success", "failed": "Error"}
_EVENT_SCHEMA: Final = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "enum": list(EVENT_NAMES)},
        "server_uuid": {"type": "string", "format": "uuid"},
        "status": {"type": "string", "enum": ["failed", "completed", "in-progress"]},
        "tag": {"type": "string", "maxLength": 255},
        "code": {"type": "integer", "enum": [200, 400, 404, 422]},
    },
    "required": ["name", "server_uuid", "status", "code"],
}
_RESPONSE: Final = {
    "type": "object",
    "properties": {"events": {"type": "array", "items": _EVENT_SCHEMA}},
    "required": ["events"],
}


@router.post(
    "/os-server-external-events",
    name="create_server_external_events",
    responses={**views.openapi_json(_RESPONSE), **views.openapi_json(_RESPONSE, 207)},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": schemas.request_schema(schemas.ExternalEvents)}
            },
        }
    },
)
async def create_server_external_events(
    request: Request, services: ServicesDep, ctx: ContextDep, version: VersionDep
) -> JSONResponse:
    """Accept, record and deliver external events; 200 if all were accepted, else 207."""
    body = schemas.validate(schemas.ExternalEvents, await read_json(request), field="body")
    for event in body.events:
        _check_name(event.name, version)
    services.policy.authorize("os_compute_api:os-server-external-events:create", ctx)
    known: set[str] = set()
    for server_id in {event.server_uuid for event in body.events}:
        with contextlib.suppress(errors.ServerNotFound):
            known.add((await services.store.get_server(server_id)).id)
    echoed: list[dict[str, Any]] = []
    accepted: list[Event] = []
    for event in body.events:
        answer = event.model_dump(exclude_none=True)
        if event.server_uuid not in known:
            answer.update(status="failed", code=404)
        elif event.name == "volume-extended" and event.tag is None:
            answer.update(status="failed", code=400)
        else:
            # Nova echoes "completed" for every accepted event, whatever status it carried.
            answer.update(status="completed", code=200)
            accepted.append(
                Event(event.server_uuid, event.name, event.tag, event.status or "completed")
            )
        echoed.append(answer)
    await _record(services, ctx, accepted)
    for accepted_event in accepted:
        services.deps.instance_events.deliver(accepted_event)
    status = 200 if all(answer["code"] == 200 for answer in echoed) else 207
    return JSONResponse({"events": echoed}, status_code=status)


def _check_name(name: str, version: Version) -> None:
    allowed = [n for n, since in EVENT_NAMES.items() if version.at_least(since)]
    if name not in allowed:
        raise errors.ValidationFailed(
            field="name", value=schemas.show(name), reason=f"'{name}' is not one of {allowed}"
        )


async def _record(services: Services, ctx: RequestContext, events: list[Event]) -> None:
    """One finished action per server; the request's id names it when it names one server
    (action request ids are unique), otherwise each server's action gets its own id."""
    by_server: dict[str, list[Event]] = {}
    for event in events:
        by_server.setdefault(event.server_id, []).append(event)
    now = utcnow()
    for server_id, server_events in by_server.items():
        request_id = ctx.request_id if len(by_server) == 1 else f"req-{uuid.uuid4()}"
        action = NewAction(ACTION, request_id, ctx.user_id, ctx.project_id)
        rows = [
            ActionEvent(
                event=event.name,
                start_time=now,
                finish_time=now,
                result=_RESULTS.get(event.status),
                traceback=None,
                details=None if event.tag is None else f"tag: {event.tag}",
                host=services.deps.host,
            )
            for event in server_events
        ]
        await services.store.add_finished_action(server_id, action, rows)
