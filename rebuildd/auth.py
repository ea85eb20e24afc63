"""Who is calling, and what they may do: authenticators and Nova-style policy rules.

Owns authentication (``REBUILDD_AUTH``: ``none`` — every caller is the configured project's
admin, as with Nova's noauth2 — ``token``: a tokens file maps each token to a user, project
and roles — or ``keystone``: :mod:`rebuildd.keystone` asks Keystone), the
:class:`Authenticator` port both implement, and authorisation (named rules, Nova's defaults,
overridable in a policy file). It must not know HTTP: the API layer turns its errors into
401/403/503 faults.

Tokens file (TOML), read again whenever it changes (a revoked token stops working without a
restart); a token and its ``roles`` must not be empty, and roles imply the lesser ones as
Keystone's default implied roles do (admin -> member -> reader)::

    [tokens.s3cr3t-admin]
    user_id = "alice"
    project_id = "demo"
    roles = ["admin"]

Policy file (TOML), each rule one of ``admin``, ``admin_or_owner`` (a member of the target's
project), ``admin_or_reader`` (a reader or member of it), ``member``, ``reader`` (any project's
reader: what may then be seen is the target's own check, e.g. an image's visibility),
``service`` (the ``service`` role: other OpenStack services), ``anyone``; an admin passes every
rule. Image rules are Glance's (``get_image``, ``publicize_image``, ...), volume rules
Cinder's (``volume:get``, ``volume:create``, ...)::

    [rules]
    "os_compute_api:servers:rebuild" = "admin"
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

import structlog

from rebuildd import errors
from rebuildd.models import Image, RequestContext

log = structlog.get_logger("rebuildd.auth")

# Nova's defaults: PROJECT_READER_OR_ADMIN to read, PROJECT_MEMBER_OR_ADMIN for server
# actions, ADMIN for the rest.
DEFAULT_RULES: Final[Mapping[str, str]] = {
    "os_compute_api:servers:index": "admin_or_reader",
    "os_compute_api:servers:detail": "admin_or_reader",
    "os_compute_api:servers:show": "admin_or_reader",
    "os_compute_api:os-instance-actions:list": "admin_or_reader",
    "os_compute_api:os-instance-actions:show": "admin_or_reader",
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
    "os_compute_api:os-admin-actions:reset_state": "admin",
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
    # Glance's defaults (glance/policies/image.py): ADMIN_OR_PROJECT_READER to list,
    # ADMIN_OR_PROJECT_READER_GET_IMAGE to show (a reader, then the image's visibility),
    # ADMIN_OR_PROJECT_MEMBER_DOWNLOAD_IMAGE to download, ADMIN_OR_PROJECT_MEMBER of the
    # image's owner to change it, role:admin to make it public.
    "get_images": "admin_or_reader",
    "get_image": "reader",
    "download_image": "member",
    "add_image": "admin_or_owner",
    "modify_image": "admin_or_owner",
    "upload_image": "admin_or_owner",
    "delete_image": "admin_or_owner",
    "publicize_image": "admin",
    "communitize_image": "admin_or_owner",
    # Cinder's defaults (cinder/policies/volumes.py, volume_actions.py, attachments.py):
    # PROJECT_READER_OR_ADMIN to read, PROJECT_MEMBER_OR_ADMIN to change.
    "volume:get_all": "admin_or_reader",
    "volume:get": "admin_or_reader",
    "volume:create": "admin_or_owner",
    "volume:delete": "admin_or_owner",
}
RULE_KINDS: Final = frozenset(
    {"admin", "admin_or_owner", "admin_or_reader", "member", "reader", "service", "anyone"}
)
# Keystone's default implied roles: a token's roles include those its roles imply.
IMPLIED_ROLES: Final[Mapping[str, tuple[str, ...]]] = {
    "admin": ("member", "reader"),
    "member": ("reader",),
}


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


class TokensFileError(ValueError):
    """The tokens file cannot be used (the daemon refuses to start with it)."""


def _with_implied(roles: tuple[str, ...]) -> tuple[str, ...]:
    implied = [r for role in roles for r in IMPLIED_ROLES.get(role, ())]
    return tuple(dict.fromkeys([*roles, *implied]))


def parse_tokens(text: str, source: str = "tokens file") -> dict[str, Identity]:
    """The tokens of a tokens file, or TokensFileError naming what is wrong."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TokensFileError(f"{source}: not TOML: {exc}") from None
    table = data.get("tokens", {})
    if not isinstance(table, dict):
        raise TokensFileError(f"{source}: [tokens] must be a table")
    tokens = {}
    for token, entry in table.items():
        where = f"{source}: tokens.{token!r}"
        if not token.strip():
            raise TokensFileError(f"{where}: an empty token would authenticate anyone")
        if not isinstance(entry, dict):
            raise TokensFileError(f"{where} must be a table")
        roles = entry.get("roles", ["member", "reader"])
        if not isinstance(roles, list) or not all(isinstance(r, str) and r for r in roles):
            raise TokensFileError(f"{where}: roles must be a list of role names")
        if not roles:
            raise TokensFileError(f"{where}: roles must not be empty")
        ids = {name: entry.get(name) for name in ("user_id", "project_id")}
        if bad := [n for n, v in ids.items() if not isinstance(v, str) or not v.strip()]:
            raise TokensFileError(f"{where}: {bad[0]} must be a non-empty string")
        tokens[token] = Identity(
            user_id=str(ids["user_id"]),
            project_id=str(ids["project_id"]),
            roles=_with_implied(tuple(roles)),
        )
    return tokens


class TokenTable:
    """Static tokens from a TOML file, read again when the file changes.

    Each lookup compares the file's identity (inode, size, mtime) with the one last read, one
    ``stat`` a request; a file that no longer parses refuses every token until it is fixed
    (failing closed: a revocation with a typo must not leave the revoked token working).
    """

    challenge = None

    def __init__(self, tokens: Mapping[str, Identity], path: Path | None = None) -> None:
        self._tokens = dict(tokens)
        self._path = path
        self._seen = _file_key(path) if path is not None else None

    @classmethod
    def load(cls, path: Path) -> TokenTable:
        try:
            text = path.read_text()
        except OSError as exc:
            raise TokensFileError(f"{path}: {exc.strerror}") from None
        if path.stat().st_mode & 0o077:
            log.warning("tokens_file_readable_by_others", path=str(path), hint="chmod 600")
        return cls(parse_tokens(text, str(path)), path)

    def reload(self) -> None:
        """Read the file again (on a change, or on SIGHUP)."""
        if self._path is None:
            return
        self._seen = _file_key(self._path)
        try:
            self._tokens = parse_tokens(self._path.read_text(), str(self._path))
        except (OSError, TokensFileError) as exc:
            log.error("tokens_file_unusable", path=str(self._path), error=str(exc))
            self._tokens = {}
            return
        log.info("tokens_file_reloaded", path=str(self._path), tokens=len(self._tokens))

    async def authenticate(self, token: str | None) -> Identity:
        if self._path is not None and _file_key(self._path) != self._seen:
            self.reload()
        identity = self._tokens.get(token) if token else None
        if identity is None:
            raise errors.Unauthorized()
        return identity

    async def aclose(self) -> None:
        return None


def _file_key(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


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
        if kind == "reader":
            return is_member or "reader" in context.roles
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


def image_visible(context: RequestContext, image: Image) -> bool:
    """Glance's visibility (its database layer's ``is_image_visible``): an admin sees every
    image, and so does everyone an image without an owner; others their project's, and public
    and community ones. There are no image members here, so a ``shared`` image is its owner's
    alone."""
    if context.is_admin or image.owner is None or image.owner == context.project_id:
        return True
    return image.visibility in ("public", "community")
