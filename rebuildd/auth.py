"""Who is calling, and what they may do: authenticators and Nova-style policy rules.

Owns authentication (``REBUILDD_AUTH``: ``none`` — every caller is the configured project's
admin, as with Nova's noauth2 — ``token``: a tokens file maps each token to a user, project
and roles — or ``keystone``: :mod:`rebuildd.keystone` asks Keystone), the
:class:`Authenticator` port both implement, and authorisation (named rules, Nova's defaults,
overridable in a policy file). It must not know HTTP: the API layer turns its errors into
401/403/503 faults.

Tokens file (TOML)::

    [tokens.s3cr3t-admin]
    user_id = "alice"
    project_id = "demo"
    roles = ["admin", "member", "reader"]

Policy file (TOML), each rule one of ``admin``, ``admin_or_owner`` (a member of the target's
project), ``admin_or_reader`` (a reader or member of it), ``member``, ``service`` (the
``service`` role: other OpenStack services), ``anyone``; an admin passes every rule::

    [rules]
    "os_compute_api:servers:rebuild" = "admin"
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from rebuildd import errors
from rebuildd.models import RequestContext

# Nova's defaults: PROJECT_MEMBER_OR_ADMIN for server actions, ADMIN for the rest.
DEFAULT_RULES: Final[Mapping[str, str]] = {
    "os_compute_api:servers:create": "admin_or_owner",
    "os_compute_api:servers:create:trusted_certs": "admin_or_owner",
    "os_compute_api:servers:delete": "admin_or_owner",
    "os_compute_api:servers:rebuild": "admin_or_owner",
    "os_compute_api:servers:rebuild:trusted_certs": "admin_or_owner",
    "os_compute_api:servers:start": "admin_or_owner",
    "os_compute_api:servers:stop": "admin_or_owner",
    "os_compute_api:os-lock-server:lock": "admin_or_owner",
    "os_compute_api:os-lock-server:unlock": "admin_or_owner",
    "os_compute_api:os-lock-server:unlock:unlock_override": "admin",
    "os_compute_api:os-flavor-manage:create": "admin",
    "os_compute_api:os-instance-actions:events": "admin",
    "os_compute_api:os-instance-actions:events:details": "admin",
    # PROJECT_READER_OR_ADMIN to read, PROJECT_MEMBER_OR_ADMIN to change.
    "os_compute_api:os-volumes-attachments:index": "admin_or_reader",
    "os_compute_api:os-volumes-attachments:show": "admin_or_reader",
    "os_compute_api:os-volumes-attachments:create": "admin_or_owner",
    "os_compute_api:os-volumes-attachments:delete": "admin_or_owner",
    # Nova's SERVICE_ROLE (rule:service_or_admin): Cinder, Neutron, ... with role service.
    "os_compute_api:os-server-external-events:create": "service",
}
RULE_KINDS: Final = frozenset(
    {"admin", "admin_or_owner", "admin_or_reader", "member", "service", "anyone"}
)


@dataclass(frozen=True, slots=True)
class Identity:
    user_id: str
    project_id: str
    roles: tuple[str, ...]


class Authenticator(Protocol):
    """Turns a request's ``X-Auth-Token`` into an Identity, or raises Unauthorized (401) or
    ServiceUnavailable (503, when whatever it asks does not answer)."""

    @property
    def challenge(self) -> str | None:
        """The ``WWW-Authenticate`` value sent with a 401, if any."""
        ...

    async def authenticate(self, token: str | None) -> Identity: ...

    async def aclose(self) -> None: ...


class TokenTable:
    """Static tokens read once from a TOML file."""

    challenge = None

    def __init__(self, tokens: Mapping[str, Identity]) -> None:
        self._tokens = dict(tokens)

    @classmethod
    def load(cls, path: Path) -> TokenTable:
        data = tomllib.loads(path.read_text())
        tokens = {}
        for token, entry in data.get("tokens", {}).items():
            tokens[token] = Identity(
                user_id=str(entry["user_id"]),
                project_id=str(entry["project_id"]),
                roles=tuple(str(r) for r in entry.get("roles", ["member", "reader"])),
            )
        return cls(tokens)

    async def authenticate(self, token: str | None) -> Identity:
        identity = self._tokens.get(token or "")
        if identity is None:
            raise errors.Unauthorized()
        return identity

    async def aclose(self) -> None:
        return None


class Policy:
    """Named rules, each evaluated against the caller and the target's project."""

    def __init__(self, overrides: Mapping[str, str] | None = None) -> None:
        rules = {**DEFAULT_RULES, **(overrides or {})}
        bad = {name: kind for name, kind in rules.items() if kind not in RULE_KINDS}
        if bad:
            raise ValueError(f"unknown policy rule kinds: {bad}")
        self.rules = rules

    @classmethod
    def load(cls, path: Path | None) -> Policy:
        if path is None:
            return cls()
        return cls(
            {str(k): str(v) for k, v in tomllib.loads(path.read_text()).get("rules", {}).items()}
        )

    def allows(self, rule: str, context: RequestContext, target_project: str | None = None) -> bool:
        kind = self.rules.get(rule, "admin")
        if kind == "anyone" or context.is_admin:
            return True
        if kind == "admin":
            return False
        if kind == "service":
            return "service" in context.roles
        is_member = "member" in context.roles
        if kind == "member":
            return is_member
        own = target_project is None or target_project == context.project_id
        if kind == "admin_or_reader":
            return own and (is_member or "reader" in context.roles)
        return is_member and own

    def authorize(
        self, rule: str, context: RequestContext, target_project: str | None = None
    ) -> None:
        """Nova's ``context.can``: raise Forbidden (403) unless the rule allows the caller."""
        if not self.allows(rule, context, target_project):
            raise errors.Forbidden(action=rule)
