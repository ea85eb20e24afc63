"""Keystone v3 token validation (``REBUILDD_AUTH=keystone``): what keystonemiddleware's
auth_token does in front of Nova, for an ASGI app, as one cached httpx call.

Owns the conversation with Keystone: rebuildd's own service token (password auth with the
service credentials of the settings, renewed before it expires or when Keystone answers 401),
``GET /v3/auth/tokens`` with that token in ``X-Auth-Token`` and the caller's in
``X-Subject-Token``, and the cache of validated tokens (until the earlier of the token's
``expires_at`` and ``cache_seconds``; keyed by the token's SHA-256, so tokens are not held
verbatim). Keystone's 404 (unknown, expired or revoked token) is a 401 with
``WWW-Authenticate: Keystone uri="..."``; a Keystone that does not answer, or refuses
rebuildd's own credentials, is a 503 (keystonemiddleware answers 503 there too), never a 500.
It must not know FastAPI or the policy: it returns an :class:`~rebuildd.auth.Identity`.

:class:`ServiceSession` is rebuildd's own identity towards the other services, as Nova's
``[service_user]`` and ``[cinder]``/``[glance]`` keystoneauth sessions are: one token (with its
catalog, where the endpoints of Glance and Cinder are found), renewed before it expires or once
a service answers 401 to it; :class:`ServiceTokenAuth` puts it on httpx requests as
``X-Service-Token`` (and as ``X-Auth-Token`` unless the request carries a user's token).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
from collections.abc import AsyncGenerator, Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Final, TypeVar

import httpx
import structlog
from pydantic import BaseModel, ConfigDict, ValidationError

from rebuildd import errors
from rebuildd.auth import Identity
from rebuildd.models import utcnow

log = structlog.get_logger("rebuildd.keystone")

TIMEOUT: Final = 10.0  # seconds for one call to Keystone
# Renew the service token this long before it expires, so a validation never carries a token
# that expires in flight (keystoneauth's stale duration is of the same order).
RENEW_BEFORE: Final = dt.timedelta(seconds=30)
MAX_CACHED: Final = 10000
B = TypeVar("B", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class KeystoneConfig:
    """Where Keystone is and who rebuildd is there (from the ``REBUILDD_KEYSTONE_*`` settings)."""

    url: str  # the identity endpoint, with or without its /v3
    username: str
    password: str
    project_name: str
    user_domain_name: str = "Default"
    project_domain_name: str = "Default"
    cache_seconds: float = 300.0  # 0: validate every request

    @property
    def api_url(self) -> str:
        return self.url.rstrip("/").removesuffix("/v3")


class _Named(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str
    name: str | None = None


class _Token(BaseModel):
    """The part of Keystone's token body rebuildd reads."""

    model_config = ConfigDict(extra="ignore")
    expires_at: dt.datetime
    user: _Named
    project: _Named | None = None
    roles: list[_Named] = []


class _TokenBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    token: _Token


@dataclass(frozen=True, slots=True)
class _Cached:
    identity: Identity
    until: dt.datetime


class KeystoneAuthenticator:
    """The :class:`~rebuildd.auth.Authenticator` of ``REBUILDD_AUTH=keystone``; owns one
    long-lived ``httpx.AsyncClient`` (``transport`` lets tests put a fake Keystone behind it)."""

    def __init__(
        self,
        config: KeystoneConfig,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self.config = config
        self._client = httpx.AsyncClient(
            base_url=config.api_url, transport=transport, timeout=TIMEOUT
        )
        self._clock = clock
        self._cache: dict[str, _Cached] = {}
        self.session = ServiceSession(config, self._client, clock=clock)

    @property
    def challenge(self) -> str:
        """keystonemiddleware's header on every 401: where to get a token."""
        return f'Keystone uri="{self.config.url.rstrip("/")}"'

    async def aclose(self) -> None:
        await self._client.aclose()

    async def authenticate(self, token: str | None) -> Identity:
        if not token:
            raise errors.Unauthorized()
        key = hashlib.sha256(token.encode()).hexdigest()
        now = self._clock()
        cached = self._cache.get(key)
        if cached is not None and now < cached.until:
            return cached.identity
        self._cache.pop(key, None)
        body = await self._validate(token)
        identity = _identity(body)
        if self.config.cache_seconds > 0:
            until = min(body.expires_at, now + dt.timedelta(seconds=self.config.cache_seconds))
            self._remember(key, _Cached(identity, until), now)
        return identity

    def _remember(self, key: str, entry: _Cached, now: dt.datetime) -> None:
        if len(self._cache) >= MAX_CACHED:
            self._cache = {k: v for k, v in self._cache.items() if now < v.until}
            if len(self._cache) >= MAX_CACHED:
                self._cache.clear()
        self._cache[key] = entry

    async def _validate(self, token: str) -> _Token:
        """``GET /v3/auth/tokens``; once more with a new service token if Keystone says 401."""
        service: str | None = None
        for _attempt in (1, 2):
            service = await self.session.token(stale=service)
            headers = {"X-Auth-Token": service, "X-Subject-Token": token}
            with _unavailable("validate token"):
                response = await self._client.get(
                    "/v3/auth/tokens", headers=headers, params={"nocatalog": ""}
                )
            if response.status_code == 200:
                return _parse(response, "validate token")
            if response.status_code == 404:
                log.info("token refused by keystone")
                raise errors.Unauthorized()
            if response.status_code != 401:
                break
        if response.status_code in (401, 403):
            log.error(
                "keystone refused rebuildd's service token",
                status=response.status_code,
                hint="the service user needs the service (or admin) role to validate tokens",
            )
        else:
            log.error("keystone failed to validate a token", status=response.status_code)
        raise errors.IdentityUnavailable()


def _identity(token: _Token) -> Identity:
    if token.project is None:
        # Compute resources belong to projects: an unscoped or domain-scoped token names none.
        log.info("token refused: not scoped to a project", user_id=token.user.id)
        raise errors.Unauthorized()
    return Identity(
        user_id=token.user.id,
        project_id=token.project.id,
        roles=tuple(role.name or role.id for role in token.roles),
    )


def _parse(response: httpx.Response, call: str) -> _Token:
    return _parse_body(response, call, _TokenBody).token


def _parse_body(response: httpx.Response, call: str, model: type[B]) -> B:
    try:
        return model.model_validate_json(response.content)
    except ValidationError as exc:
        log.error("keystone answered an unreadable token", call=call, error=str(exc)[:200])
        raise errors.IdentityUnavailable() from None


@contextlib.contextmanager
def _unavailable(call: str) -> Iterator[None]:
    """The one boundary where httpx's errors become rebuildd's (a 503, as keystonemiddleware)."""
    try:
        yield
    except httpx.TransportError as exc:
        log.error("keystone unreachable", call=call, error=type(exc).__name__, detail=str(exc))
        raise errors.IdentityUnavailable() from None


class _Endpoint(BaseModel):
    model_config = ConfigDict(extra="ignore")
    interface: str
    url: str
    region_id: str | None = None
    region: str | None = None


class _Service(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    endpoints: list[_Endpoint] = []


class _ServiceToken(_Token):
    catalog: list[_Service] = []


class _ServiceTokenBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    token: _ServiceToken


@dataclass(frozen=True, slots=True)
class _Held:
    token: str
    expires_at: dt.datetime
    catalog: tuple[_Service, ...]


class ServiceSession:
    """rebuildd's own token: password auth with the service credentials, one renewal at a
    time, the catalog of the last token kept for endpoint lookups."""

    def __init__(
        self,
        config: KeystoneConfig,
        client: httpx.AsyncClient,
        *,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self.config = config
        self._client = client
        self._clock = clock
        self._held: _Held | None = None
        self._lock = asyncio.Lock()

    async def token(self, *, stale: str | None = None) -> str:
        """The current token; a new one if it is about to expire, or if it is ``stale`` (a
        service refused it) — unless another request has renewed it meanwhile."""
        return (await self._current(stale)).token

    async def endpoint(
        self, service_types: tuple[str, ...], *, interface: str, region: str | None
    ) -> str:
        """The URL of the first of ``service_types`` (in that order, as keystoneauth's
        service-types aliases are tried) the catalog lists for ``interface`` (and ``region``),
        as Nova's ``get_endpoint`` finds Glance and Cinder."""
        held = await self._current(None)
        for wanted in service_types:
            for service in held.catalog:
                if service.type != wanted:
                    continue
                for ep in service.endpoints:
                    if ep.interface == interface and region in (None, ep.region_id, ep.region):
                        return ep.url
        raise LookupError(
            f"the Keystone catalog lists no {interface} endpoint of "
            f"{' or '.join(service_types)}" + (f" in region {region}" if region else "")
        )

    async def _current(self, stale: str | None) -> _Held:
        async with self._lock:
            held = self._held
            fresh = held is not None and self._clock() < held.expires_at - RENEW_BEFORE
            if held is not None and fresh and (stale is None or held.token != stale):
                return held
            self._held = await self._password_auth()
            return self._held

    async def _password_auth(self) -> _Held:
        c = self.config
        body = {
            "auth": {
                "identity": {
                    "methods": ["password"],
                    "password": {
                        "user": {
                            "name": c.username,
                            "domain": {"name": c.user_domain_name},
                            "password": c.password,
                        }
                    },
                },
                "scope": {
                    "project": {"name": c.project_name, "domain": {"name": c.project_domain_name}}
                },
            }
        }
        with _unavailable("service token"):
            response = await self._client.post("/v3/auth/tokens", json=body)
        token = response.headers.get("x-subject-token")
        if response.status_code != 201 or not token:
            log.error("keystone refused rebuildd's credentials", status=response.status_code)
            raise errors.IdentityUnavailable()
        parsed = _parse_body(response, "service token", _ServiceTokenBody).token
        log.info("service token obtained", user=c.username, project=c.project_name)
        return _Held(
            token=token,
            expires_at=parsed.expires_at,
            catalog=tuple(parsed.catalog),
        )


class ServiceTokenAuth(httpx.Auth):
    """rebuildd's service token on each request: ``X-Service-Token`` always (Nova's
    ``send_service_user_token``; Cinder wants it to delete an attachment), ``X-Auth-Token``
    too unless the request already carries a user's. A 401 renews the token and retries once."""

    def __init__(self, session: ServiceSession) -> None:
        self.session = session

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        user_token = "x-auth-token" in request.headers
        token: str | None = None
        for attempt in (1, 2):
            token = await self.session.token(stale=token if attempt == 2 else None)
            request.headers["X-Service-Token"] = token
            if not user_token:
                request.headers["X-Auth-Token"] = token
            response = yield request
            if response.status_code != 401:
                return

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        raise RuntimeError("ServiceTokenAuth needs an httpx.AsyncClient")
        yield request  # pragma: no cover - makes this a generator
