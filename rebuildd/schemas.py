"""Request bodies as pydantic models, per microversion range, and Nova-style 400 messages.

Owns the shape of what clients may send (unknown fields are rejected, as Nova's JSON schemas
do) and the translation of pydantic's errors into Nova's "Invalid input for field/attribute"
message. Semantics (does the image exist, ...) belong to the pipeline, not here.

Secrets (``adminPass``, ``user_data``, personality ``contents``) are never rendered into a
message: :func:`show` replaces their values with ``***`` wherever a request value is echoed,
and a validation error located under a secret key shows ``***`` as its value.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import math
import re
import unicodedata
import uuid
from typing import Annotated, Any, ClassVar, Final, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)
from pydantic.json_schema import WithJsonSchema

from rebuildd import errors
from rebuildd.microversion import Version

MAX_INT: Final = 2147483647  # Nova's db.MAX_INT: the columns are 32-bit integers
MAX_FLOAT: Final = 3.40282e38  # Nova's rxtx_factor bound (a 32-bit float column)


def _no_edge_whitespace(value: str) -> str:
    if value != value.strip():
        raise ValueError("leading or trailing whitespace is not allowed")
    return value


def _printable(value: str) -> str:
    """Nova's name and description rule: no control, format, surrogate or unassigned characters
    and no line or paragraph separators (such text cannot go into a libvirt domain's XML, nor a
    log line)."""
    for char in value:
        category = unicodedata.category(char)
        if category.startswith("C") or category in {"Zl", "Zp"}:
            raise ValueError(f"character {char!r} is not allowed in a name")
    return value


def _no_control(value: str) -> str:
    """Text that XML 1.0 can hold and a log line shows as it is: no control character (tab and
    newline included), surrogate or non-character (U+FFFE, U+FFFF)."""
    for char in value:
        if unicodedata.category(char) in {"Cc", "Cs"} or char in "\ufffe\uffff":
            raise ValueError(f"character {char!r} is not allowed")
    return value


def _uuid(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ValueError(f"'{value}' is not a 'uuid'") from None


def _base64(value: str) -> str:
    """Nova's ``base64`` format: what ``base64.decodebytes`` accepts."""
    try:
        base64.decodebytes(value.encode("ascii"))
    except (ValueError, binascii.Error):
        raise ValueError(f"{REDACTED} is not a 'base64'") from None
    return value


def _unique(value: list[str]) -> list[str]:
    if len(set(value)) != len(value):
        raise ValueError(f"{value!r} has non-unique elements")
    return value


def _ipv4(value: str) -> str:
    ipaddress.IPv4Address(value)
    return value


def _ipv6(value: str) -> str:
    """Nova's ``ipv6`` format (netaddr's, hence inet_pton's): no ``%zone`` suffix; kept in the
    compressed form, at most 39 characters (the column's width)."""
    if "%" in value:
        raise ValueError(f"'{value}' is not a 'ipv6'")
    return str(ipaddress.IPv6Address(value))


def _user_data_at_create(value: str) -> str:
    """Create's ``user_data``: base64 as ``base64.decodebytes`` reads it, else Nova's
    InstanceUserDataMalformed (the message carries no part of the secret)."""
    try:
        base64.decodebytes(value.encode("ascii"))
    except (ValueError, binascii.Error):
        raise errors.InstanceUserDataMalformed() from None
    return value


# Block devices rebuildd can attach: virtio disks, as volume_jobs.next_device names them.
_VIRTIO_DEVICE: Final = re.compile(r"(?:/dev/)?vd[a-z]")


def _device_name(value: str) -> str:
    """Nova's block_device.validate_device_name, then what the libvirt virtio bus can honour:
    ``vdX`` or ``/dev/vdX`` (``hda``, ``sdb`` or ``/dev/../x`` would only fail in the job)."""
    if not 1 <= len(value) <= 255:
        raise errors.InvalidBDM(reason="Device name empty or too long.")
    if " " in value:
        raise errors.InvalidBDM(reason="Device name contains spaces.")
    if _VIRTIO_DEVICE.fullmatch(value) is None:
        raise errors.InvalidBDM(
            reason=f"Device name {value!r} is not a virtio disk (vd[a-z] or /dev/vd[a-z])."
        )
    return value


Name = Annotated[
    str,
    StringConstraints(min_length=1, max_length=255),
    AfterValidator(_no_edge_whitespace),
    AfterValidator(_printable),
]
Uuid = Annotated[str, AfterValidator(_uuid), WithJsonSchema({"type": "string", "format": "uuid"})]
MetadataKey = Annotated[str, StringConstraints(pattern=r"^[a-zA-Z0-9-_:. ]{1,255}$")]
MetadataValue = Annotated[str, StringConstraints(max_length=255)]
Metadata = dict[MetadataKey, MetadataValue]
Description = Annotated[str, StringConstraints(max_length=255), AfterValidator(_printable)]
IPv4 = Annotated[str, AfterValidator(_ipv4), WithJsonSchema({"type": "string", "format": "ipv4"})]
IPv6 = Annotated[str, AfterValidator(_ipv6), WithJsonSchema({"type": "string", "format": "ipv6"})]
UserData = Annotated[
    str,
    StringConstraints(max_length=65535),
    AfterValidator(_base64),
    WithJsonSchema({"type": "string", "format": "base64", "maxLength": 65535}),
]
# Nova's trusted_certs: 1-50 unique non-empty strings.
TrustedCerts = Annotated[
    list[Annotated[str, StringConstraints(min_length=1)]],
    Field(min_length=1, max_length=50),
    AfterValidator(_unique),
    WithJsonSchema(
        {
            "type": "array",
            "minItems": 1,
            "maxItems": 50,
            "uniqueItems": True,
            "items": {"type": "string", "minLength": 1},
        }
    ),
]
# Nova's parameter_types.hostname (an RFC 1123 label) and fqdn (underscores allowed, as Nova).
Hostname = Annotated[
    str,
    StringConstraints(
        min_length=2, max_length=63, pattern=r"^[a-zA-Z0-9]+[a-zA-Z0-9-]*[a-zA-Z0-9]+$"
    ),
]
Fqdn = Annotated[str, StringConstraints(min_length=1, max_length=255, pattern=r"^[a-zA-Z0-9-._]*$")]
# Create's user_data: the same bounds as rebuild's, Nova's own message when it is not base64.
CreateUserData = Annotated[
    str,
    StringConstraints(max_length=65535),
    AfterValidator(_user_data_at_create),
    WithJsonSchema({"type": "string", "format": "base64", "maxLength": 65535}),
]
DeviceName = Annotated[
    str,
    AfterValidator(_device_name),
    WithJsonSchema({"type": "string", "pattern": "^(/dev/)?vd[a-z]$"}),
]
# Nova's parameter_types.tag.
Tag = Annotated[str, StringConstraints(max_length=60, pattern=r"^[^,/]*$")]


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


class RebuildBase(Strict):
    """The fields every ``rebuild`` range has."""

    imageRef: Uuid
    name: Name | None = None
    adminPass: str | None = None
    metadata: Metadata | None = None
    preserve_ephemeral: bool | None = None
    diskConfig: Literal["AUTO", "MANUAL"] | None = Field(default=None, alias="OS-DCF:diskConfig")
    accessIPv4: IPv4 | None = None
    accessIPv6: IPv6 | None = None


class RebuildV21(RebuildBase):
    """``rebuild`` for 2.1-2.18."""

    personality: list[Personality] | None = None


class RebuildV219(RebuildV21):
    """2.19-2.53: ``description`` (nullable)."""

    nullable: ClassVar[frozenset[str]] = frozenset({"description"})
    description: Description | None = None


class RebuildV254(RebuildV219):
    """2.54-2.56: ``key_name`` (nullable)."""

    nullable: ClassVar[frozenset[str]] = frozenset({"description", "key_name"})
    key_name: Name | None = None


class RebuildV257(RebuildBase):
    """2.57-2.62: 2.54's fields without ``personality``, and ``user_data`` (base64, nullable:
    null clears it, omitted keeps it)."""

    nullable: ClassVar[frozenset[str]] = frozenset({"description", "key_name", "user_data"})
    description: Description | None = None
    key_name: Name | None = None
    user_data: UserData | None = None


class RebuildV263(RebuildV257):
    """2.63-2.89: ``trusted_image_certificates`` (nullable)."""

    nullable: ClassVar[frozenset[str]] = RebuildV257.nullable | {"trusted_image_certificates"}
    trusted_image_certificates: TrustedCerts | None = None


class RebuildV290(RebuildV263):
    """2.90-2.93: ``hostname``, an RFC 1123 label."""

    hostname: Hostname | None = None


class RebuildV294(RebuildV263):
    """2.94 and later: ``hostname`` may be a fully qualified domain name."""

    hostname: Fqdn | None = None


def rebuild_model(version: Version) -> type[RebuildBase]:
    for minimum, model in _REBUILD_MODELS:
        if version.at_least(minimum):
            return model
    return RebuildV21


_REBUILD_MODELS: Final[tuple[tuple[str, type[RebuildBase]], ...]] = (
    ("2.94", RebuildV294),
    ("2.90", RebuildV290),
    ("2.63", RebuildV263),
    ("2.57", RebuildV257),
    ("2.54", RebuildV254),
    ("2.19", RebuildV219),
)


class BlockDeviceMappingV2(Strict):
    """One ``block_device_mapping_v2`` entry (Nova's block_device_mapping_new_item)."""

    nullable: ClassVar[frozenset[str]] = frozenset(
        {"boot_index", "device_name", "uuid", "volume_size", "destination_type", "tag"}
    )
    source_type: Literal["volume", "image", "snapshot", "blank"]
    destination_type: Literal["local", "volume"] | None = None
    uuid: Uuid | None = None
    boot_index: Annotated[int, Field(ge=-1, le=MAX_INT)] | None = None
    volume_size: Annotated[int, Field(ge=1, le=MAX_INT)] | None = None
    delete_on_termination: bool = False
    device_name: DeviceName | None = None
    disk_bus: Annotated[str, StringConstraints(max_length=255)] | None = None
    device_type: Annotated[str, StringConstraints(max_length=255)] | None = None
    guest_format: Annotated[str, StringConstraints(max_length=255)] | None = None
    volume_type: Annotated[str, StringConstraints(max_length=255)] | None = None
    tag: Tag | None = None
    no_device: bool | None = None


class CreateServerV21(Strict):
    """``server`` of POST /servers for the fields rebuildd supports: boot from an image, or
    from a volume (``block_device_mapping_v2``, with ``imageRef`` empty or absent)."""

    name: Name
    imageRef: Uuid | Literal[""] | None = None
    block_device_mapping_v2: list[BlockDeviceMappingV2] | None = None
    flavorRef: Annotated[str, StringConstraints(min_length=1, max_length=255)]
    adminPass: str | None = None
    metadata: Metadata | None = None
    key_name: Name | None = None
    user_data: CreateUserData | None = None
    accessIPv4: IPv4 | None = None
    accessIPv6: IPv6 | None = None
    diskConfig: Literal["AUTO", "MANUAL"] | None = Field(default=None, alias="OS-DCF:diskConfig")
    config_drive: bool | None = None
    availability_zone: Name | None = None  # Nova's parameter_types.name
    min_count: Literal[1] | None = None
    max_count: Literal[1] | None = None
    # rebuildd does not manage networks or security groups; these are accepted and ignored
    # so that clients which always send them keep working.
    networks: Literal["auto", "none"] | list[dict[str, Any]] | None = None
    security_groups: list[dict[str, Any]] | None = None


class CreateServerV219(CreateServerV21):
    """2.19-2.62: ``description`` (nullable)."""

    nullable: ClassVar[frozenset[str]] = frozenset({"description"})
    description: Description | None = None


class CreateServerV263(CreateServerV219):
    """2.63-2.89: ``trusted_image_certificates`` (nullable)."""

    nullable: ClassVar[frozenset[str]] = frozenset({"description", "trusted_image_certificates"})
    trusted_image_certificates: TrustedCerts | None = None


class CreateServerV290(CreateServerV263):
    """2.90-2.93: ``hostname``, an RFC 1123 label."""

    hostname: Hostname | None = None


class CreateServerV294(CreateServerV263):
    """2.94 and later: ``hostname`` may be a fully qualified domain name."""

    hostname: Fqdn | None = None


def create_model(version: Version) -> type[CreateServerV21]:
    for minimum, model in _CREATE_MODELS:
        if version.at_least(minimum):
            return model
    return CreateServerV21


_CREATE_MODELS: Final[tuple[tuple[str, type[CreateServerV21]], ...]] = (
    ("2.94", CreateServerV294),
    ("2.90", CreateServerV290),
    ("2.63", CreateServerV263),
    ("2.19", CreateServerV219),
)


class LockBody(Strict):
    """``lock`` from 2.73."""

    locked_reason: Annotated[str, StringConstraints(max_length=255)] | None = None


class ResetStateBody(Strict):
    """``os-resetState`` (Nova's reset_server_state schema): the vm_state to set."""

    state: Literal["active", "error"]


class ExternalEvent(Strict):
    """One event of ``POST /os-server-external-events``; the names a microversion admits are
    checked by the route (instance_events.EVENT_NAMES), as Nova's schema per range does."""

    name: str
    server_uuid: Uuid
    status: Literal["failed", "completed", "in-progress"] | None = None
    tag: Annotated[str, StringConstraints(max_length=255)] | None = None


class ExternalEvents(Strict):
    events: Annotated[list[ExternalEvent], Field(min_length=1)]


class FlavorCreate(Strict):
    name: Name
    ram: Annotated[int, Field(ge=1, le=MAX_INT)]
    vcpus: Annotated[int, Field(ge=1, le=MAX_INT)]
    disk: Annotated[int, Field(ge=0, le=MAX_INT)]
    id: (
        Annotated[
            str,
            StringConstraints(pattern=r"^[a-zA-Z0-9._-]([a-zA-Z0-9. _-]{0,253}[a-zA-Z0-9._-])?$"),
        ]
        | None
    ) = None
    ephemeral: Annotated[int, Field(ge=0, le=MAX_INT)] = Field(
        default=0, alias="OS-FLV-EXT-DATA:ephemeral"
    )
    swap: Annotated[int, Field(ge=0, le=MAX_INT)] = 0
    rxtx_factor: Annotated[float, Field(gt=0, le=MAX_FLOAT)] = 1.0
    is_public: bool = Field(default=True, alias="os-flavor-access:is_public")
    description: Description | None = None
    nullable: ClassVar[frozenset[str]] = frozenset({"id", "description"})


class KeypairCreate(Strict):
    name: Annotated[str, StringConstraints(pattern=r"^[a-zA-Z0-9 _@.-]{1,255}$")]
    public_key: Annotated[str, StringConstraints(min_length=1, max_length=65535)]
    type: Literal["ssh", "x509"] = "ssh"
    user_id: str | None = None


def _property_key(value: str) -> str:
    if len(value) > 255:  # Glance's own check, with its words (LP #1737952)
        raise ValueError("Custom property should not be greater than 255 characters.")
    return _printable(value)


# Glance's image schema: custom properties are strings; the database holds a key of 255 and a
# value of 65535 characters. Neither may hold a control character: both are copied into the
# server's libvirt XML (nova:image properties) at every boot and rebuild.
PropertyKey = Annotated[str, AfterValidator(_property_key)]
PropertyValue = Annotated[str, StringConstraints(max_length=65535), AfterValidator(_no_control)]
ImageText = Annotated[str, StringConstraints(max_length=255), AfterValidator(_no_control)]

# What Glance computes itself: a create naming one of these is 403 "Attribute ... is read-only."
IMAGE_READ_ONLY: Final = frozenset(
    {
        "status", "size", "virtual_size", "checksum", "os_hash_algo", "os_hash_value", "owner",
        "created_at", "updated_at", "self", "file", "schema", "direct_url", "location",
        "locations", "os_hidden",
    }
)  # fmt: skip
# Glance's reserved attributes and namespace: 403 "Attribute ... is reserved."
IMAGE_RESERVED: Final = frozenset({"deleted", "deleted_at"})
IMAGE_RESERVED_PREFIX: Final = "os_glance"
# Glance's image_property_quota and image_tag_quota defaults (413 beyond).
IMAGE_PROPERTY_QUOTA: Final = 128
IMAGE_TAG_QUOTA: Final = 128


class ImageCreate(BaseModel):
    """Glance's POST /v2/images: known fields typed, other keys kept as custom properties
    (strings, as in Glance's image schema).

    Every image body is checked here, so that whatever re-validates an image through this
    model (a create, a patched image) gets Glance's rules: read-only and reserved attributes
    are 403, more than Glance's quota of properties or tags is 413, and keys, values, the name
    and tags are bounded strings without control characters (400).
    """

    model_config = ConfigDict(extra="allow", frozen=True)
    __pydantic_extra__: dict[PropertyKey, PropertyValue]
    id: Uuid | None = None
    name: ImageText | None = None
    disk_format: Literal["qcow2", "raw"] | None = None
    container_format: Literal["bare"] | None = None
    visibility: Literal["public", "private", "shared", "community"] = "shared"
    min_disk: Annotated[int, Field(ge=0, le=MAX_INT)] = 0
    min_ram: Annotated[int, Field(ge=0, le=MAX_INT)] = 0
    protected: bool = False
    tags: list[ImageText] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _glance_attributes(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if key in IMAGE_READ_ONLY:
                    raise errors.Forbidden(f"Attribute '{key}' is read-only.")
                if key in IMAGE_RESERVED or key.startswith(IMAGE_RESERVED_PREFIX):
                    raise errors.Forbidden(f"Attribute '{key}' is reserved.")
            properties = len(data.keys() - cls.model_fields.keys())
            if properties > IMAGE_PROPERTY_QUOTA:
                raise errors.ImagePropertyLimitExceeded(
                    attempted=properties, maximum=IMAGE_PROPERTY_QUOTA
                )
            tags = data.get("tags")
            if isinstance(tags, list) and len(tags) > IMAGE_TAG_QUOTA:
                raise errors.ImageTagLimitExceeded(attempted=len(tags), maximum=IMAGE_TAG_QUOTA)
        return data


M = TypeVar("M", bound=BaseModel)

# Keys whose values are secrets: never echoed in an error message, hence never logged.
SECRET_KEYS: Final = frozenset({"adminPass", "admin_pass", "user_data", "contents"})
REDACTED: Final = "***"


def request_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The JSON schema of a request body for the OpenAPI document: its ``$defs`` inlined (the
    document has no ``$defs`` of its own for them to resolve against), and ``null`` allowed
    only where a :class:`Strict` model accepts it."""
    schema = model.model_json_schema(by_alias=True)
    inlined: dict[str, Any] = _inline(schema, schema.pop("$defs", {}))
    if issubclass(model, Strict):
        for key, prop in inlined.get("properties", {}).items():
            options = prop.get("anyOf", [])
            if key not in model.nullable and {"type": "null"} in options:
                prop.pop("anyOf")
                prop.pop("default", None)
                rest = [option for option in options if option != {"type": "null"}]
                prop.update(rest[0] if len(rest) == 1 else {"anyOf": rest})
    return inlined


def _inline(schema: Any, defs: dict[str, Any]) -> Any:
    if isinstance(schema, dict):
        ref = schema.get("$ref", "")
        if ref.startswith("#/$defs/"):
            return _inline(defs[ref.removeprefix("#/$defs/")], defs)
        inlined = {key: _inline(value, defs) for key, value in schema.items()}
        if "patternProperties" in inlined:  # a dict whose keys pydantic constrains
            inlined.setdefault("additionalProperties", False)
        return inlined
    if isinstance(schema, list):
        return [_inline(item, defs) for item in schema]
    return schema


def parse_json(raw: bytes) -> Any:
    """The request body as JSON, or Nova's 400 "Malformed request body".

    Also refused: nesting deeper than Python's recursion limit, ``NaN``/``Infinity`` and numbers
    that overflow a float (no JSON response could carry them back), and strings no database can
    store (a lone UTF-16 surrogate such as ``"\\ud800"``, or a NUL character).
    """
    if not raw.strip():
        raise errors.MalformedBody()
    try:
        data = json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float)
        _check_strings(data)
    except (ValueError, UnicodeError, RecursionError):
        raise errors.MalformedBody() from None
    return data


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} overflows a float")
    return value


def _check_strings(value: Any) -> None:
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("NUL in a string")
        value.encode("utf-8")  # UnicodeEncodeError (a ValueError) on a lone surrogate
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_strings(key)
            _check_strings(item)
    elif isinstance(value, list):
        for item in value:
            _check_strings(item)


def validate(model: type[M], data: Any, *, field: str) -> M:
    """Validate ``data`` (the value under key ``field``) or raise Nova's 400 message."""
    if not isinstance(data, dict):
        shown = show(REDACTED if field in SECRET_KEYS else data)
        raise errors.ValidationFailed(
            field=field, value=shown, reason=f"{shown} is not of type 'object'"
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
            value=show(data),
            reason=f"Additional properties are not allowed ('{loc[-1]}' was unexpected)",
        )
    if kind == "missing":
        parent = loc[-2] if len(loc) > 1 else field
        return errors.ValidationFailed(
            field=parent, value=show(data), reason=f"'{loc[-1]}' is a required property"
        )
    secret = any(part in SECRET_KEYS for part in loc)
    value = REDACTED if secret else error.get("input")
    reason = str(error["msg"]).removeprefix("Value error, ")
    field = loc[-1] if loc else field
    return errors.ValidationFailed(field=field, value=show(value), reason=reason)


def redact(value: Any) -> Any:
    """``value`` with the value of every secret key, at any depth, replaced by ``***``."""
    if isinstance(value, dict):
        return {k: REDACTED if k in SECRET_KEYS else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(item) for item in value]
    return value


def show(value: Any) -> str:
    """How a request value appears in a message: its repr, secrets redacted, and bounded
    (a 100 KiB body is not echoed back whole)."""
    try:
        text = repr(redact(value))
    except RecursionError:
        return "<too deeply nested>"
    return text if len(text) <= _SHOW_LIMIT else text[:_SHOW_LIMIT] + "..."


_SHOW_LIMIT: Final = 1024
