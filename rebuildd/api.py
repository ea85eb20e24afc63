"""The HTTP API: Nova's compute API at /v2.1, a Glance-compatible image API at /image and a
Cinder-compatible volume API at /volume.

Owns the FastAPI application: the middleware for microversions, request ids, body size, the
trusted Host and the body's media type (so a browser on the host can drive nothing);
the one translation of errors into Nova fault bodies (FastAPI's own 422 never reaches a
client, nor the OpenAPI document); version documents; and the dependencies routes share.
Routes live in api_servers.py, api_actions.py, api_catalog.py, api_images.py,
api_volumes.py, api_volume_attachments.py and api_events.py. It must not
call libvirt or SQL directly: routes call the pipeline and the Store's records.
"""

from __future__ import annotations

import inspect
import ipaddress
import json
import re
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import Annotated, Any, Final, Protocol, TypeVar

import structlog
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, BeforeValidator, ConfigDict, RootModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from rebuildd import errors, microversion
from rebuildd.auth import Authenticator, Policy
from rebuildd.lifecycle import DomainSettings
from rebuildd.metrics import CONTENT_TYPE
from rebuildd.microversion import Version
from rebuildd.models import Image, RequestContext
from rebuildd.pipeline import Deps
from rebuildd.storage import ImageFilters, Store
from rebuildd.volumes import LocalVolumeService
from rebuildd.volumestore import VolumeStore

log = structlog.get_logger("rebuildd.api")
T = TypeVar("T")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Top-level compute collections; any other first segment under /v2.1/ is a legacy project id.
_COMPUTE_COLLECTIONS: Final = frozenset(
    {"servers", "flavors", "os-keypairs", "v2", "images", "limits", "extensions", ""}
)
# Methods whose body a route reads; DELETE with a body is not a CORS-safelisted method, so a
# browser asks first (a preflight rebuildd never answers with CORS headers).
_BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})
# Nova's and Cinder's deserializers read these; Glance reads JSON, octet-stream uploads and
# its JSON-patch media types. text/plain (which Nova and Cinder let through as "no type") and a
# body without a type are what an HTML form or a fetch() sends cross-site without a preflight.
_JSON: Final = frozenset({"application/json"})
_COMPUTE_JSON: Final = _JSON | {"application/vnd.openstack.compute+json"}
_VOLUME_JSON: Final = _JSON | {"application/vnd.openstack.volume+json"}
_OCTET_STREAM: Final = frozenset({"application/octet-stream"})
_JSON_PATCH: Final = frozenset(
    {"application/openstack-images-v2.1-json-patch", "application/openstack-images-v2.0-json-patch"}
)
# A Host header: a name or a bracketed IPv6 address, then an optional port (Django's rule).
_HOST: Final = re.compile(r"(?P<name>[a-z0-9._-]+|\[[a-f0-9]*:[a-f0-9.:]+\])(?::[0-9]*)?")
_UNEXPECTED: Final = (
    "Unexpected API Error. Please report this at https://bugs.launchpad.net/nova/ and attach "
    "the rebuildd log if possible."
)


class ImageAPI(Protocol):
    """What the Glance-compatible image routes call: images.LocalImageService, or
    glance.GlanceImageService (reads answered from Glance, writes refused)."""

    async def get(self, context: RequestContext | None, image_id: str) -> Image | None: ...

    async def list(self, filters: ImageFilters) -> list[Image]: ...

    async def create(self, context: RequestContext, fields: dict[str, Any]) -> Image: ...

    async def upload(self, image_id: str, chunks: AsyncIterator[bytes]) -> Image: ...

    def read(self, image_id: str) -> AsyncIterator[bytes]: ...

    async def delete(self, image_id: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Services:
    """Everything the routes need, built once by the daemon."""

    deps: Deps
    store: Store
    images: ImageAPI
    domain: DomainSettings
    public_url: str | None
    project_id: str
    user_id: str
    policy: Policy
    # Behind the Cinder-compatible API at /volume; None with the cinder backend (Cinder's own
    # API is the one to use then, and /volume is not served).
    volumes: LocalVolumeService | None
    volume_store: VolumeStore
    authenticator: Authenticator | None = None  # None: authentication is off
    max_body_bytes: int = 114688  # Nova's (oslo.middleware sizelimit) default
    # Host header names answered besides loopback ones (Settings.trusted_hosts).
    allowed_hosts: tuple[str, ...] = ()


def fault_body(status: int, name: str, message: str) -> dict[str, Any]:
    return {name: {"code": status, "message": message}}


class FaultDetail(BaseModel):
    code: int
    message: str


class Fault(RootModel[dict[str, FaultDetail]]):
    """Every error body: one key, the fault name (``badRequest``, ``itemNotFound``, ...)."""

    model_config = ConfigDict(json_schema_extra={"minProperties": 1, "maxProperties": 1})


_FAULT_DESCRIPTIONS: Final = {
    400: "badRequest: the request is malformed or invalid, or its Host is not trusted",
    401: "unauthorized: no valid X-Auth-Token (with REBUILDD_AUTH=token or keystone)",
    403: "forbidden: the policy refuses the caller, or a quota is exceeded",
    404: "itemNotFound",
    406: "notAcceptable: the requested microversion is out of range",
    409: "conflictingRequest: the resource's state does not allow it",
    413: "overLimit: the body is larger than REBUILDD_MAX_BODY_BYTES",
    415: "badMediaType: the body's Content-Type is not one the route reads",
    503: "serviceUnavailable: an upstream service (Keystone, Glance) failed to answer",
}


def faults(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the error statuses a route may answer, as Fault bodies."""
    return {code: {"model": Fault, "description": _FAULT_DESCRIPTIONS[code]} for code in codes}


def _json_bytes(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


class TrustedHosts:
    """The Host header values the API answers (DNS rebinding: a page whose name resolves to
    this host must not drive it): loopback names and addresses, with or without a port, plus
    the configured names; ``.example.com`` also matches its subdomains and ``*`` anything."""

    def __init__(self, names: Iterable[str]) -> None:
        entries = {_host_name(name.strip().lower()) for name in names if name.strip()}
        self.any = "*" in entries
        self.exact = {e for e in entries if not e.startswith(".")} | {"localhost"}
        self.suffixes = tuple(e for e in entries if e.startswith("."))

    def allows(self, header: str | None) -> bool:
        if self.any:
            return True
        found = _HOST.fullmatch((header or "").lower())
        if found is None:
            return False
        name = _host_name(found["name"])
        if name in self.exact or any(name == s[1:] or name.endswith(s) for s in self.suffixes):
            return True
        try:
            return ipaddress.ip_address(name).is_loopback
        except ValueError:
            return False


def _host_name(value: str) -> str:
    """A host without port, brackets or final dot (``[::1]:8774`` -> ``::1``)."""
    found = _HOST.fullmatch(value)
    name = found["name"] if found is not None else value
    return name.strip("[]").rstrip(".")


class NovaHeaders:
    """Pure ASGI middleware: request id, microversion negotiation, legacy project paths,
    trusted Host, body media type and size limit, and the response headers Nova clients
    expect on every answer."""

    def __init__(
        self, app: ASGIApp, *, max_body_bytes: int, allowed_hosts: Iterable[str] = ()
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.hosts = TrustedHosts(allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = f"req-{uuid.uuid4()}"
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        path: str = scope["path"]
        compute = path == "/v2.1" or path.startswith("/v2.1/")
        if compute:
            scope["path"] = path = _strip_project(path)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        extra: list[tuple[bytes, bytes]] = []
        version = microversion.MIN_VERSION
        if compute:
            extra.append((b"x-compute-request-id", request_id.encode()))
            extra.append((b"vary", b"OpenStack-API-Version, X-OpenStack-Nova-API-Version"))
        else:
            extra.append((b"x-openstack-request-id", request_id.encode()))
        try:
            if not self.hosts.allows(headers.get("host")):
                raise errors.Invalid("Invalid Host header.")
            _refuse_nul(scope)
            _check_media_type(scope, headers, compute=compute)
            if compute:
                version = microversion.negotiate(microversion.requested(headers))
                state["microversion"] = version
                extra.append((b"openstack-api-version", f"compute {version}".encode()))
                extra.append((b"x-openstack-nova-api-version", str(version).encode()))
                if version.at_least("2.46"):
                    extra.append((b"x-openstack-request-id", request_id.encode()))
            if (
                not _is_upload(scope)
                and int(headers.get("content-length") or 0) > self.max_body_bytes
            ):
                raise errors.PayloadTooLarge()
        except errors.RebuilddError as exc:
            await _send_fault(send, exc, extra)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + extra
            await send(message)

        limited = receive if _is_upload(scope) else _limit_body(receive, self.max_body_bytes)
        await self.app(scope, limited, send_with_headers)


def _refuse_nul(scope: Scope) -> None:
    """A NUL names no resource and no filter value (PostgreSQL cannot even compare it)."""
    if "\x00" in scope["path"]:
        raise errors.NotFound("The resource could not be found.")
    query: bytes = scope.get("query_string", b"")
    if b"%00" in query or b"\x00" in query:
        raise errors.Invalid("Invalid query parameter: NUL is not allowed.")


def _check_media_type(scope: Scope, headers: dict[str, str], *, compute: bool) -> None:
    """A body is read only in a media type its route reads (415 otherwise, as Nova)."""
    if scope["method"] not in _BODY_METHODS:
        return
    declared = headers.get("content-type")
    has_body = "transfer-encoding" in headers or headers.get("content-length", "0") != "0"
    if declared is None and not has_body:
        return
    media = (declared or "").split(";", 1)[0].strip().lower()
    if media not in _media_types(scope, compute=compute):
        raise errors.UnsupportedMediaType()


def _media_types(scope: Scope, *, compute: bool) -> frozenset[str]:
    path: str = scope["path"]
    if _is_upload(scope):
        return _OCTET_STREAM
    if scope["method"] == "PATCH" and path.startswith("/image/"):
        return _JSON_PATCH
    if compute:
        return _COMPUTE_JSON
    if path.startswith("/volume/"):
        return _VOLUME_JSON
    return _JSON


def _limit_body(receive: Receive, limit: int) -> Receive:
    """Count the body as it streams (a chunked request has no Content-Length)."""
    seen = 0

    async def limited() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise errors.PayloadTooLarge()
        return message

    return limited


def _is_upload(scope: Scope) -> bool:
    return bool(scope["method"] == "PUT" and scope["path"].startswith("/image/v2/images/"))


def _strip_project(path: str) -> str:
    """``/v2.1/{project_id}/servers/...`` routes like ``/v2.1/servers/...``."""
    parts = path.split("/", 3)  # "", "v2.1", first, rest
    if len(parts) >= 4 and parts[2] not in _COMPUTE_COLLECTIONS:
        return f"/v2.1/{parts[3]}"
    return path


async def _send_fault(
    send: Send, exc: errors.RebuilddError, extra: list[tuple[bytes, bytes]]
) -> None:
    status, name = errors.http_fault(exc)
    body = _json_bytes(fault_body(status, name, exc.message))
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


# -- dependencies ----------------------------------------------------------------------------
# All ``async def``: FastAPI runs a plain ``def`` dependency in a worker thread, a hand-off
# that cost more CPU than the rest of a GET /servers/{id} (bench/, see the README).


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


async def get_services(request: Request) -> Services:
    return _services(request)


async def get_version(request: Request) -> Version:
    version: Version = getattr(request.state, "microversion", microversion.MIN_VERSION)
    return version


async def get_context(request: Request) -> RequestContext:
    """The caller: from ``X-Auth-Token`` with token or Keystone auth (401 if unknown), else —
    auth off, as with Nova's noauth2 — the configured project's admin (the token is then
    ignored)."""
    cached: RequestContext | None = getattr(request.state, "context", None)
    if cached is not None:
        return cached
    services = _services(request)
    token: str | None = None
    if services.authenticator is None:
        user_id, project_id = services.user_id, services.project_id
        roles: tuple[str, ...] = ("admin", "member", "reader")
    else:
        token = request.headers.get("x-auth-token")
        identity = await services.authenticator.authenticate(token)
        user_id, project_id, roles = identity.user_id, identity.project_id, identity.roles
    context = RequestContext(
        request_id=request.state.request_id,
        user_id=user_id,
        project_id=project_id,
        roles=roles,
        auth_token=token,
    )
    request.state.context = context
    return context


async def get_base_url(request: Request) -> str:
    return _base_url(request, _services(request))


def _base_url(request: Request, services: Services) -> str:
    if services.public_url:
        return services.public_url.rstrip("/")
    return str(request.base_url).rstrip("/")


@dataclass(frozen=True, slots=True)
class Call:
    """What a route needs of its request, resolved as one dependency: FastAPI's cost grows
    with the number of dependencies a route has (bench/, see the README)."""

    services: Services
    context: RequestContext
    version: Version
    base: str


async def get_call(request: Request) -> Call:
    services = _services(request)
    return Call(
        services=services,
        context=await get_context(request),
        version=await get_version(request),
        base=_base_url(request, services),
    )


def _digits(value: Any) -> Any:
    """Nova's ``non_negative_integer`` query parameter: digits only ("1.0", "+1" are 400s)."""
    if isinstance(value, str) and not re.fullmatch(r"[0-9]+", value):
        raise ValueError(f"'{value}' does not match '^[0-9]+$'")
    return value


LimitQuery = Annotated[int | None, Query(ge=0), BeforeValidator(_digits)]


def query_model(cls: type[T]) -> Callable[..., Awaitable[T]]:
    """An ``async def`` dependency that builds ``cls`` (a dataclass of query parameters) from
    its fields; ``Depends(cls)`` itself would build it in a worker thread."""

    async def build(**params: Any) -> T:
        return cls(**params)

    build.__signature__ = inspect.signature(cls, eval_str=True)  # type: ignore[attr-defined]
    return build


ServicesDep = Annotated[Services, Depends(get_services)]
VersionDep = Annotated[Version, Depends(get_version)]
ContextDep = Annotated[RequestContext, Depends(get_context)]
BaseUrlDep = Annotated[str, Depends(get_base_url)]
CallDep = Annotated[Call, Depends(get_call)]


async def read_json(request: Request) -> Any:
    from rebuildd.schemas import parse_json

    return parse_json(await request.body())


# -- the app ---------------------------------------------------------------------------------


def _operation_id(route: APIRoute) -> str:
    return route.name


def create_app(services: Services, *, lifespan: Any = None) -> FastAPI:
    from rebuildd import (
        api_actions,
        api_catalog,
        api_events,
        api_images,
        api_servers,
        api_volume_attachments,
        api_volumes,
    )

    app = FastAPI(
        title="rebuildd",
        version="0.1.0",
        description="Nova's compute API for rebuilding servers in place on one libvirt host.",
        generate_unique_id_function=_operation_id,
        lifespan=lifespan,
        responses=faults(400, 413, 415),
    )
    app.state.services = services
    app.add_exception_handler(errors.RebuilddError, _rebuildd_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected_error)
    # Everything but the version documents; any of it may be refused by the policy.
    authenticated: dict[str, Any] = {
        "dependencies": [Depends(get_context)],
        "responses": faults(401, 403, 503),
    }
    app.include_router(api_servers.versions)
    app.include_router(api_images.versions, prefix="/image")
    if services.volumes is not None:
        app.include_router(api_volumes.versions, prefix="/volume")
    app.include_router(api_servers.router, prefix="/v2.1", **authenticated)
    app.include_router(api_actions.router, prefix="/v2.1", **authenticated)
    app.include_router(api_events.router, prefix="/v2.1", **authenticated)
    app.include_router(api_catalog.router, prefix="/v2.1", **authenticated)
    app.include_router(api_images.router, prefix="/image", **authenticated)
    app.include_router(api_images.compute_alias, prefix="/v2.1", **authenticated)
    app.include_router(api_volume_attachments.router, prefix="/v2.1", **authenticated)
    if services.volumes is not None:
        app.include_router(api_volumes.router, prefix="/volume", **authenticated)
    app.add_api_route("/metrics", _metrics, methods=["GET"], include_in_schema=False)
    app.add_middleware(
        NovaHeaders,
        max_body_bytes=services.max_body_bytes,
        allowed_hosts=services.allowed_hosts,
    )
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


async def _metrics(services: ServicesDep) -> Response:
    """Prometheus metrics (unauthenticated, as exporters are; listen on loopback or filter)."""
    metrics = services.deps.runner.metrics
    return Response(metrics.render(), media_type=CONTENT_TYPE)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document without its 422 (invalid input is a 400 badRequest fault here)."""
    if app.openapi_schema is None:
        document = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        for operations in document.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        schemas = document.get("components", {}).get("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        app.openapi_schema = document
    return app.openapi_schema


def _fault_response(
    status: int, name: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(fault_body(status, name, message), status_code=status, headers=headers)


async def _rebuildd_error(request: Request, exc: errors.RebuilddError) -> JSONResponse:
    status, name = errors.http_fault(exc)
    log.info("request refused", path=request.url.path, status=status, reason=exc.message)
    headers = None
    authenticator = _services(request).authenticator
    if status == 401 and authenticator is not None and authenticator.challenge:
        # As keystonemiddleware: every 401 says where to authenticate.
        headers = {"WWW-Authenticate": authenticator.challenge}
    if isinstance(exc, errors.ServiceUnavailable) and exc.retry_after is not None:
        headers = {"Retry-After": str(exc.retry_after)}
    return _fault_response(status, name, errors.user_message(exc), headers)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 405:
        return _fault_response(
            405, "badMethod", "The method specified is not allowed for this resource."
        )
    if exc.status_code == 404:
        return _fault_response(404, "itemNotFound", "The resource could not be found.")
    return _fault_response(exc.status_code, "badRequest", str(exc.detail))


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's checks of query and path parameters, in Nova's words (never a 422)."""
    from rebuildd.schemas import show

    first = exc.errors()[0] if exc.errors() else {}
    where, *names = [str(p) for p in first.get("loc", ())] or ["request"]
    name = ".".join(names) or where
    reason = first.get("msg", "invalid")
    if where == "query":
        value = show(first.get("input"))
        message = f"Invalid input for query parameters {name}. Value: {value}. {reason}"
    else:
        message = f"Invalid input for field/attribute {name}. {reason}"
    log.info("request refused", path=request.url.path, status=400, reason=message)
    return _fault_response(400, "badRequest", message)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    """A bug: logged with where it happened but without the exception's message or the frames'
    locals, either of which may hold a request's secrets (SQLAlchemy puts bound parameters,
    pydantic the input, in their messages)."""
    log.error(
        "unexpected error",
        path=request.url.path,
        error=type(exc).__name__,
        traceback="".join(traceback.format_tb(exc.__traceback__)),
    )
    return _fault_response(500, "computeFault", _UNEXPECTED)
