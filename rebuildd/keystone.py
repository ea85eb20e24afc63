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
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

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
        self._service_token: tuple[str, dt.datetime] | None = None
        self._service_lock = asyncio.Lock()

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
        for attempt in (1, 2):
            service = await self._service(renew=attempt == 2)
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

    async def _service(self, *, renew: bool) -> str:
        """rebuildd's own token, from password auth; one request at a time renews it."""
        async with self._service_lock:
            held = self._service_token
            if held is not None and not renew and self._clock() < held[1] - RENEW_BEFORE:
                return held[0]
            self._service_token = await self._password_auth()
            return self._service_token[0]

    async def _password_auth(self) -> tuple[str, dt.datetime]:
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
            response = await self._client.post(
                "/v3/auth/tokens", json=body, params={"nocatalog": ""}
            )
        token = response.headers.get("x-subject-token")
        if response.status_code != 201 or not token:
            log.error("keystone refused rebuildd's credentials", status=response.status_code)
            raise errors.IdentityUnavailable()
        log.info("service token obtained", user=c.username, project=c.project_name)
        return token, _parse(response, "service token").expires_at


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
    try:
        return _TokenBody.model_validate_json(response.content).token
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
