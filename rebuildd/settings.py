"""rebuildd's settings: ``REBUILDD_*`` environment variables, then an optional TOML file.

Owns parsing, defaults and the checks of the start (``load``): an unknown ``REBUILDD_*``
variable or file key, a missing file or an invalid value stops the start with one line.
Settings are built once, in the entry point, and passed down; nothing else reads the
environment. Every field is documented in docs/configuration.md.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Final, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

PREFIX: Final = "REBUILDD_"
# Listen addresses that name every interface, not one host.
WILDCARD_ADDRESSES: Final = frozenset({"", "0.0.0.0", "::", "[::]"})  # noqa: S104


class ConfigError(ValueError):
    """The environment or the config file names no setting, a file that is missing, or a
    value that is invalid: the CLI prints the one-line message and exits."""


class Settings(BaseSettings):
    """All knobs of the daemon. Environment variables win over the config file."""

    model_config = SettingsConfigDict(env_prefix="REBUILDD_", extra="forbid", frozen=True)

    config_file: Path | None = Field(
        default=None, description="TOML file with the same keys in lower case (no prefix)."
    )
    state_dir: Path = Field(
        default=Path("/var/lib/rebuildd"),
        description="Holds the SQLite database, the image store, the image cache, instance disks.",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy async URL; default sqlite+aiosqlite:///<state_dir>/rebuildd.db. "
        "PostgreSQL: postgresql+asyncpg://user@host:5432/db.",
    )
    libvirt_uri: str = Field(default="test:///default", description="libvirt connection URI.")
    domain_type: Literal["auto", "kvm", "qemu", "test"] = Field(
        default="auto",
        description="<domain type=...> for new servers; auto: test on test:///, kvm when "
        "libvirt offers it and KVM is hardware virtualisation (kvm_intel/kvm_amd; a PVM "
        "/dev/kvm runs no real OS), else qemu (TCG). The choice is logged at start.",
    )
    domain_name_prefix: str = Field(
        default="rebuildd-", description="libvirt domain name = prefix + server uuid."
    )
    interface_type: Literal["none", "user", "network"] = Field(
        default="user",
        description="Network interface given to new servers: none, user (QEMU user-mode "
        "networking; no bridge needed) or network (libvirt network named by interface_network).",
    )
    interface_network: str = Field(default="default", description="libvirt network name.")
    host: str = Field(default="", description="This host's name in the API; default hostname.")
    listen_host: str = Field(default="127.0.0.1", description="Default for serve --host.")
    listen_port: int = Field(default=8774, description="Default for serve --port.")
    allow_insecure_listen: bool = Field(
        default=False,
        description="Let serve listen beyond loopback with auth=none (an unauthenticated admin "
        "API for anyone who can reach the port); refused otherwise.",
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated Host header values accepted besides loopback names and "
        "addresses, the listen address and public_url's host (400 otherwise, against DNS "
        "rebinding); .example.com also matches its subdomains, * matches any.",
    )
    public_url: str | None = Field(
        default=None,
        description="Base URL used in links (e.g. https://cloud.example/compute); default: the "
        "URL of the request.",
    )
    auth: Literal["none", "token", "keystone"] = Field(
        default="none",
        description="none: every caller is the configured project's admin (bind to loopback); "
        "token: X-Auth-Token must be a token of tokens_file; keystone: X-Auth-Token is "
        "validated by the Keystone at keystone_url.",
    )
    tokens_file: Path | None = Field(
        default=None, description="TOML file mapping tokens to user, project and roles."
    )
    keystone_url: str | None = Field(
        default=None,
        description="Keystone's identity endpoint (e.g. http://keystone:5000/v3), for "
        "auth=keystone; also the uri of the WWW-Authenticate header of a 401.",
    )
    keystone_username: str | None = Field(
        default=None, description="rebuildd's service user (needs the service or admin role)."
    )
    keystone_password: SecretStr | None = Field(
        default=None, description="The service user's password."
    )
    keystone_project_name: str | None = Field(
        default=None, description="The project of rebuildd's service token (e.g. service)."
    )
    keystone_user_domain_name: str = Field(
        default="Default", description="Domain of the service user."
    )
    keystone_project_domain_name: str = Field(
        default="Default", description="Domain of the service project."
    )
    keystone_cache_seconds: float = Field(
        default=300,
        ge=0,
        description="Seconds a validated token is trusted without asking Keystone again (never "
        "past its expiry); 0 validates every request.",
    )
    catalog_interface: Literal["public", "internal", "admin"] = Field(
        default="public",
        description="Which endpoints of the Keystone catalog rebuildd calls (for Glance and "
        "Cinder URLs that are not set).",
    )
    catalog_region: str | None = Field(
        default=None, description="The catalog region to take endpoints from (any if unset)."
    )
    policy_file: Path | None = Field(
        default=None, description="TOML file overriding policy rules (see README)."
    )
    project_id: str = Field(
        default="demo", description="Project id of requests while authentication is off."
    )
    user_id: str = Field(default="demo", description="User id of requests while auth is off.")
    max_concurrent_operations: int = Field(
        default=8, ge=1, description="Pipeline jobs (build, rebuild, stop, ...) run at once."
    )
    libvirt_threads: int = Field(
        default=16, ge=1, description="Worker threads for blocking libvirt calls."
    )
    shutdown_timeout: float = Field(
        default=60.0,
        ge=0,
        description="Seconds a guest gets to shut down cleanly before it is destroyed.",
    )
    volume_detach_timeout: float = Field(
        default=20.0,
        ge=0,
        description="Seconds a running guest gets to release a volume being detached (Nova's "
        "device_detach_timeout); a disk still attached then fails the detach, unchanged.",
    )
    power_sync_interval: float = Field(
        default=600.0,
        ge=0,
        description="Seconds between two passes of the power-state sync (Nova's "
        "sync_power_state_interval); libvirt's lifecycle events trigger one too. 0: events only.",
    )
    drain_timeout: float = Field(
        default=120.0,
        ge=0,
        description="On SIGTERM, seconds running jobs get to finish before they are interrupted.",
    )
    max_volume_size_gb: int = Field(
        default=1024,
        ge=1,
        le=2147483647,
        description="Largest local volume, in GiB (Cinder's per_volume_gigabytes): a create, "
        "or a server's block_device_mapping_v2 volume_size, beyond it is 413.",
    )
    max_body_bytes: int = Field(
        default=114688,
        ge=1024,
        description="Largest request body (413 above); image uploads are not limited.",
    )
    max_connections: int = Field(
        default=1000,
        ge=1,
        description="Open client connections at most (lowered at start to fit the open-file "
        "limit); one more closes the longest-idle connection not serving a request, else the "
        "one whose request body has waited longest for a byte, else the new one.",
    )
    max_header_bytes: int = Field(
        default=65536,
        ge=1024,
        description="Largest request line and headers together (431 and closed above).",
    )
    max_header_count: int = Field(
        default=100, ge=8, description="Most header fields in one request (431 above)."
    )
    header_timeout: float = Field(
        default=10.0,
        gt=0,
        description="Seconds a client has to send a request's line and headers, from its "
        "connection or the request's first byte; then the connection is closed.",
    )
    body_timeout: float = Field(
        default=60.0,
        gt=0,
        description="Seconds a request body may pause (no byte arriving) before its connection "
        "is closed.",
    )
    keep_alive_timeout: int = Field(
        default=5,
        gt=0,
        description="Seconds an idle connection is kept open between requests.",
    )
    old_root_disk_retention: float = Field(
        default=0,
        ge=0,
        description="Seconds a replaced root disk is kept (renamed retired-*) before it is "
        "deleted; 0 deletes it as soon as the rebuilt domain has started.",
    )
    ephemeral_format: Literal["ext4", "ext3", "ext2", "none"] = Field(
        default="ext4",
        description="Filesystem of a flavor's ephemeral disk (label ephemeral0, as Nova's "
        "default_ephemeral_format); none leaves it blank.",
    )
    force_config_drive: bool = Field(
        default=False, description="Give every new server a config drive (Nova's option)."
    )
    console_log_dir: Path | None = Field(
        default=None,
        description="When set, each new server's serial console is appended to "
        "<dir>/<domain name>.log (QEMU writes it; the directory must exist).",
    )
    image_cache_interval: float = Field(
        default=2400,
        ge=0,
        description="Seconds between passes of the image cache cleanup (Nova's "
        "image_cache.manager_interval); 0 turns the cleanup off.",
    )
    image_cache_min_age: float = Field(
        default=86400,
        ge=0,
        description="An unused base file is removed only once it has not been used for this "
        "many seconds (Nova's remove_unused_original_minimum_age_seconds).",
    )
    image_backend: Literal["local", "glance"] = Field(
        default="local",
        description="local: rebuildd's own image store (served at /image); glance: images "
        "come from the Glance at glance_url, and /image answers reads from it.",
    )
    glance_url: str | None = Field(
        default=None,
        description="Glance's endpoint for image_backend=glance (e.g. http://glance:9292; a "
        "trailing /v2 is dropped). Unset: the catalog's image endpoint (needs the keystone_* "
        "service credentials).",
    )
    glance_timeout: float = Field(
        default=60.0,
        gt=0,
        description="Seconds rebuildd waits for Glance to connect or to send the next bytes "
        "(of an answer or of an image download).",
    )
    volume_backend: Literal["local", "cinder"] = Field(
        default="local",
        description="local: rebuildd's own volumes (files under the state dir, served at "
        "/volume); cinder: the Cinder at cinder_url, with rebuildd's service token (the "
        "keystone_* credentials; the service user needs the admin and service roles).",
    )
    cinder_url: str | None = Field(
        default=None,
        description="Cinder's endpoint for volume_backend=cinder (e.g. "
        "http://cinder:8776/v3; a project id after /v3 is dropped). Unset: the catalog's "
        "block-storage (volumev3) endpoint.",
    )
    cinder_timeout: float = Field(
        default=60.0, gt=0, description="Seconds rebuildd waits for one answer of Cinder."
    )
    cinder_wait_timeout: float = Field(
        default=180.0,
        gt=0,
        description="Seconds a volume Cinder creates or deletes may take (Nova's "
        "block_device_allocate_retries x interval).",
    )
    nfs_mount_point_base: Path | None = Field(
        default=None,
        description="Where this host mounts the NFS shares of Cinder volumes, each at "
        "<base>/<md5 of the share> (Nova's [libvirt] nfs_mount_point_base); default "
        "<state_dir>/mnt.",
    )
    undo_retry_timeout: float = Field(
        default=300.0,
        ge=0,
        description="Seconds the rollback of a failed job keeps retrying an undo that needs an "
        "upstream service (Cinder, Glance, Keystone) that is down, before it gives up and the "
        "server goes to ERROR.",
    )
    reimage_timeout_per_gb: float = Field(
        default=20.0,
        gt=0,
        description="Seconds a volume-backed rebuild (2.93+) waits for the root volume's "
        "re-image, per GiB of the image (at least one GiB's worth; Nova's option).",
    )
    failed_rebuild_state: Literal["error", "previous"] = Field(
        default="error",
        description="Where a rebuild that failed and was rolled back leaves the server: error "
        "(vm_state ERROR with a fault, so clients' waits report the failure; the guest is back "
        "on its previous image and power state) or previous (its vm_state before the rebuild).",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info")
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto", description="auto: console on a TTY, JSON otherwise."
    )
    qemu_img: str = Field(default="qemu-img", description="qemu-img executable.")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
        config_file = os.environ.get("REBUILDD_CONFIG_FILE")
        if config_file:
            sources += (TomlConfigSettingsSource(settings_cls, toml_file=Path(config_file)),)
        return sources

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [host.strip() for host in value.split(",") if host.strip()]
        return value

    @property
    def trusted_hosts(self) -> tuple[str, ...]:
        """The Host header names the API answers besides loopback: allowed_hosts, the listen
        address when it is one address, and public_url's host."""
        hosts = [*self.allowed_hosts]
        if self.listen_host not in WILDCARD_ADDRESSES:
            hosts.append(self.listen_host)
        if self.public_url and urlsplit(self.public_url).hostname:
            hosts.append(str(urlsplit(self.public_url).hostname))
        return tuple(hosts)

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{self.state_dir / 'rebuildd.db'}"

    @property
    def effective_host(self) -> str:
        import socket

        return self.host or socket.gethostname()


def load() -> Settings:
    """The settings of this process (environment, then REBUILDD_CONFIG_FILE), checked: every
    ``REBUILDD_*`` variable and file key must name a setting, every file named must exist."""
    for key in sorted(os.environ):
        name = key.upper()
        if name.startswith(PREFIX) and name[len(PREFIX) :].lower() not in Settings.model_fields:
            raise _unknown(name[len(PREFIX) :].lower(), shown=name, where="", prefix=PREFIX)
    config_file = os.environ.get("REBUILDD_CONFIG_FILE")
    if config_file:
        _check_config_file(Path(config_file))
    try:
        settings = Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"invalid setting {PREFIX}{field.upper()}: {first['msg']}") from None
    for field in ("tokens_file", "policy_file"):
        path = getattr(settings, field)
        if path is not None and not path.is_file():
            raise ConfigError(f"{PREFIX}{field.upper()}: {path} does not exist")
    return settings


def _check_config_file(path: Path) -> None:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{PREFIX}CONFIG_FILE: {path} does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{PREFIX}CONFIG_FILE: {path}: {exc}") from None
    for key in data:
        if key not in Settings.model_fields:
            raise _unknown(key, shown=key, where=f" in {path}", prefix="")


def _unknown(name: str, *, shown: str, where: str, prefix: str) -> ConfigError:
    close = difflib.get_close_matches(name, list(Settings.model_fields), n=1)
    if not close:
        return ConfigError(f"unknown setting {shown}{where} (see docs/configuration.md)")
    suggestion = f"{prefix}{close[0].upper()}" if prefix else close[0]
    return ConfigError(f"unknown setting {shown}{where}; did you mean {suggestion}?")
