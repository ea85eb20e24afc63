"""Request bodies as pydantic models, per microversion range, and Nova-style 400 messages.

Owns the shape of what clients may send (unknown fields are rejected, as Nova's JSON schemas
do) and the translation of pydantic's errors into Nova's "Invalid input for field/attribute"
message. Semantics (does the image exist, ...) belong to the pipeline, not here.
"""

from __future__ import annotations

import ipaddress
import json
import uuid
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from rebuildd import errors
from rebuildd.microversion import Version


def _no_edge_whitespace(value: str) -> str:
    if value != value.strip():
        raise ValueError("leading or trailing whitespace is not allowed")
    return value


def _uuid(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ValueError(f"'{value}' is not a 'uuid'") from None


def _ipv4(value: str) -> str:
    ipaddress.IPv4Address(value)
    return value


def _ipv6(value: str) -> str:
    ipaddress.IPv6Address(value)
    return value


Name = Annotated[
    str, StringConstraints(min_length=1, max_length=255), AfterValidator(_no_edge_whitespace)
]
Uuid = Annotated[str, AfterValidator(_uuid)]
MetadataKey = Annotated[str, StringConstraints(pattern=r"^[a-zA-Z0-9-_:. ]{1,255}$")]
MetadataValue = Annotated[str, StringConstraints(max_length=255)]
Metadata = dict[MetadataKey, MetadataValue]
Description = Annotated[str, StringConstraints(max_length=255)]
IPv4 = Annotated[str, AfterValidator(_ipv4)]
IPv6 = Annotated[str, AfterValidator(_ipv6)]


class Strict(BaseModel):
    """Unknown fields are a 400, and only fields listed in ``nullable`` may be null."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)
    nullable: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="before")
    @classmethod
    def _reject_nulls(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, value in data.items():
                if value is None and key not in cls.nullable:
                    raise ValueError(f"None is not valid for '{key}'")
        return data


class Personality(Strict):
    path: Annotated[str, StringConstraints(max_length=255)]
    contents: str


class RebuildV21(Strict):
    """``rebuild`` for 2.1-2.18."""

    imageRef: Uuid
    name: Name | None = None
    adminPass: str | None = None
    metadata: Metadata | None = None
    preserve_ephemeral: bool | None = None
    diskConfig: Literal["AUTO", "MANUAL"] | None = Field(default=None, alias="OS-DCF:diskConfig")
    accessIPv4: IPv4 | None = None
    accessIPv6: IPv6 | None = None
    personality: list[Personality] | None = None


class RebuildV219(RebuildV21):
    """2.19-2.53: ``description`` (nullable)."""

    nullable: ClassVar[frozenset[str]] = frozenset({"description"})
    description: Description | None = None


class RebuildV254(RebuildV219):
    """2.54 and later (the later ranges are a later issue): ``key_name`` (nullable)."""

    nullable: ClassVar[frozenset[str]] = frozenset({"description", "key_name"})
    key_name: Name | None = None


def rebuild_model(version: Version) -> type[RebuildV21]:
    if version.at_least("2.54"):
        return RebuildV254
    if version.at_least("2.19"):
        return RebuildV219
    return RebuildV21


class CreateServerV21(Strict):
    """``server`` of POST /servers for the fields rebuildd supports (boot from image)."""

    name: Name
    imageRef: Uuid
    flavorRef: Annotated[str, StringConstraints(min_length=1, max_length=255)]
    adminPass: str | None = None
    metadata: Metadata | None = None
    key_name: Name | None = None
    user_data: Annotated[str, StringConstraints(max_length=65535)] | None = None
    accessIPv4: IPv4 | None = None
    accessIPv6: IPv6 | None = None
    diskConfig: Literal["AUTO", "MANUAL"] | None = Field(default=None, alias="OS-DCF:diskConfig")
    config_drive: bool | None = None
    availability_zone: str | None = None
    min_count: Literal[1] | None = None
    max_count: Literal[1] | None = None
    # rebuildd does not manage networks or security groups; these are accepted and ignored
    # so that clients which always send them keep working.
    networks: Literal["auto", "none"] | list[dict[str, Any]] | None = None
    security_groups: list[dict[str, Any]] | None = None


class CreateServerV219(CreateServerV21):
    nullable: ClassVar[frozenset[str]] = frozenset({"description"})
    description: Description | None = None


def create_model(version: Version) -> type[CreateServerV21]:
    return CreateServerV219 if version.at_least("2.19") else CreateServerV21


class FlavorCreate(Strict):
    name: Name
    ram: Annotated[int, Field(ge=1)]
    vcpus: Annotated[int, Field(ge=1)]
    disk: Annotated[int, Field(ge=0)]
    id: (
        Annotated[
            str,
            StringConstraints(pattern=r"^[a-zA-Z0-9._-]([a-zA-Z0-9. _-]{0,253}[a-zA-Z0-9._-])?$"),
        ]
        | None
    ) = None
    ephemeral: Annotated[int, Field(ge=0)] = Field(default=0, alias="OS-FLV-EXT-DATA:ephemeral")
    swap: Annotated[int, Field(ge=0)] = 0
    rxtx_factor: Annotated[float, Field(gt=0)] = 1.0
    is_public: bool = Field(default=True, alias="os-flavor-access:is_public")
    description: Description | None = None
    nullable: ClassVar[frozenset[str]] = frozenset({"id", "description"})


class KeypairCreate(Strict):
    name: Annotated[str, StringConstraints(pattern=r"^[a-zA-Z0-9 _@.-]{1,255}$")]
    public_key: Annotated[str, StringConstraints(min_length=1, max_length=65535)]
    type: Literal["ssh", "x509"] = "ssh"
    user_id: str | None = None


class ImageCreate(BaseModel):
    """Glance's POST /v2/images: known fields typed, other keys kept as custom properties."""

    model_config = ConfigDict(extra="allow", frozen=True)
    id: Uuid | None = None
    name: Annotated[str, StringConstraints(max_length=255)] | None = None
    disk_format: Literal["qcow2", "raw"] | None = None
    container_format: Literal["bare"] | None = None
    visibility: Literal["public", "private", "shared", "community"] = "shared"
    min_disk: Annotated[int, Field(ge=0)] = 0
    min_ram: Annotated[int, Field(ge=0)] = 0
    protected: bool = False
    tags: list[str] = Field(default_factory=list)


M = TypeVar("M", bound=BaseModel)


def parse_json(raw: bytes) -> Any:
    """The request body as JSON, or Nova's 400 "Malformed request body"."""
    if not raw.strip():
        raise errors.MalformedBody()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise errors.MalformedBody() from None


def validate(model: type[M], data: Any, *, field: str) -> M:
    """Validate ``data`` (the value under key ``field``) or raise Nova's 400 message."""
    if not isinstance(data, dict):
        raise errors.ValidationFailed(
            field=field, value=_show(data), reason=f"{_show(data)} is not of type 'object'"
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _nova_message(exc, data, field) from None


def _nova_message(exc: ValidationError, data: dict[str, Any], field: str) -> errors.Invalid:
    error = exc.errors(include_url=False)[0]
    loc = [str(part) for part in error["loc"]]
    kind = error["type"]
    if kind == "extra_forbidden":
        parent = loc[-2] if len(loc) > 1 else field
        return errors.ValidationFailed(
            field=parent,
            value=_show(data),
            reason=f"Additional properties are not allowed ('{loc[-1]}' was unexpected)",
        )
    if kind == "missing":
        parent = loc[-2] if len(loc) > 1 else field
        return errors.ValidationFailed(
            field=parent, value=_show(data), reason=f"'{loc[-1]}' is a required property"
        )
    value = error.get("input")
    reason = str(error["msg"]).removeprefix("Value error, ")
    return errors.ValidationFailed(
        field=loc[-1] if loc else field, value=_show(value), reason=reason
    )


def _show(value: Any) -> str:
    return repr(value)
