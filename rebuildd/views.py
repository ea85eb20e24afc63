"""JSON views of servers, flavors, images, key pairs and instance actions, as Nova and Glance
render them for a given microversion.

Owns response shapes only: it takes records and returns dicts; no I/O, no HTTP objects.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rebuildd import imageprops
from rebuildd.microversion import Version, parse
from rebuildd.models import (
    BlockDevice,
    Fault,
    Flavor,
    Image,
    InstanceAction,
    KeyPair,
    Server,
)
from rebuildd.states import status_from_state

# A microversion a view tests, parsed once (Version.at_least parses its argument per call).
_v = functools.cache(parse)

JSON = dict[str, Any]


def isotime(value: dt.datetime | None) -> str | None:
    """Nova's ``utils.isotime``: second precision with a ``Z``."""
    return None if value is None else value.strftime("%Y-%m-%dT%H:%M:%SZ")


def microtime(value: dt.datetime | None) -> str | None:
    """How Nova serialises other datetimes (launched_at, action times)."""
    return None if value is None else value.strftime("%Y-%m-%dT%H:%M:%S.%f")


def _links(base: str, collection: str, item_id: str) -> list[JSON]:
    return [
        {"rel": "self", "href": f"{base}/v2.1/{collection}/{item_id}"},
        {"rel": "bookmark", "href": f"{base}/{collection}/{item_id}"},
    ]


def host_id(server: Server) -> str:
    """Nova's hostId: sha224 of project id + host, opaque per project."""
    if not server.host:
        return ""
    return hashlib.sha224((server.project_id + server.host).encode()).hexdigest()


def server_brief(server: Server, base: str) -> JSON:
    return {"id": server.id, "name": server.name, "links": _links(base, "servers", server.id)}


def _flavor_ref(flavor: Flavor, base: str, version: Version) -> JSON:
    if version >= _v("2.47"):
        return {
            "vcpus": flavor.vcpus,
            "ram": flavor.ram,
            "disk": flavor.disk,
            "ephemeral": flavor.ephemeral,
            "swap": flavor.swap,
            "original_name": flavor.name,
            "extra_specs": dict(flavor.extra_specs),
        }
    return {
        "id": flavor.id,
        "links": [{"rel": "bookmark", "href": f"{base}/flavors/{flavor.id}"}],
    }


_PROGRESS_STATUSES = frozenset(
    {"ACTIVE", "BUILD", "REBUILD", "RESIZE", "VERIFY_RESIZE", "MIGRATING"}
)
_FAULT_STATUSES = frozenset({"ERROR", "DELETED"})


@dataclass(frozen=True, slots=True)
class _Show:
    """Which parts of Nova's server view a response carries (Nova's ``show(..., show_X=)``)."""

    full: bool  # the GET view's extended parts: AZ, config drive, usage, status, volumes, ...
    key_name: bool
    server_groups: bool
    ext_user_data: bool  # OS-EXT-SRV-ATTR:user_data (the rebuild response has user_data instead)


def _image_ref(server: Server, base: str, version: Version) -> JSON | str:
    """The server's image, or ``""`` for a volume-backed server (Nova's empty image_ref)."""
    if not server.image_ref:
        return ""
    view: JSON = {
        "id": server.image_ref,
        "links": [{"rel": "bookmark", "href": f"{base}/images/{server.image_ref}"}],
    }
    if version >= _v("2.98"):
        view["properties"] = imageprops.shown(server.image_properties)
    return view


def _server_view(
    server: Server,
    base: str,
    version: Version,
    fault: Fault | None,
    *,
    is_admin: bool,
    show: _Show,
    volumes: Sequence[BlockDevice] = (),
) -> JSON:
    """Nova's ``ViewBuilder.show`` for one server, as ``show`` selects its parts."""
    status = status_from_state(server.vm_state, server.task_state)
    view: JSON = {
        "id": server.id,
        "name": server.name,
        "status": status,
        "tenant_id": server.project_id,
        "user_id": server.user_id,
        "metadata": dict(server.metadata),
        "hostId": host_id(server),
        "image": _image_ref(server, base, version),
        "flavor": _flavor_ref(server.flavor, base, version),
        "created": isotime(server.created_at),
        "updated": isotime(server.updated_at),
        "addresses": {},
        "accessIPv4": server.access_ip_v4,
        "accessIPv6": server.access_ip_v6,
        "links": _links(base, "servers", server.id),
        "OS-DCF:diskConfig": "AUTO" if server.auto_disk_config else "MANUAL",
    }
    if fault is not None and status in _FAULT_STATUSES:
        view["fault"] = {
            "code": fault.code,
            "created": isotime(fault.created_at),
            "message": fault.message,
        }
    if status in _PROGRESS_STATUSES:
        view["progress"] = server.progress
    if show.full:
        view.update(_extended(server, version, volumes))
    if show.key_name:
        view["key_name"] = server.key_name
    if show.full and is_admin:
        view.update(_admin_attributes(server, version, user_data=show.ext_user_data))
    view.update(_microversion_fields(server, version, is_admin=is_admin, show=show))
    return view


def _microversion_fields(server: Server, version: Version, *, is_admin: bool, show: _Show) -> JSON:
    """What microversions 2.9 and later add to the server view."""
    view: JSON = {}
    if version >= _v("2.9"):
        view["locked"] = server.locked
    if show.full and is_admin and version >= _v("2.16"):
        # rebuildd is the host's compute service and it is up while it answers.
        view["host_status"] = "UP" if server.host else ""
    if version >= _v("2.19"):
        view["description"] = server.description
    if version >= _v("2.26"):
        view["tags"] = []  # rebuildd has no server tags: Nova's value for an untagged server
    if version >= _v("2.63"):
        certs = server.trusted_certs
        view["trusted_image_certificates"] = None if certs is None else list(certs)
    if show.server_groups:
        view["server_groups"] = []  # rebuildd has no server groups: Nova's value for none
    if version >= _v("2.73"):
        view["locked_reason"] = server.locked_reason
    if version >= _v("2.90") and not (show.full and is_admin):
        view["OS-EXT-SRV-ATTR:hostname"] = server.hostname
    if show.full and version >= _v("2.96"):
        # No availability zone is requested at boot in rebuildd: Nova's value for an unpinned one.
        view["pinned_availability_zone"] = None
    if version >= _v("2.100"):
        view["scheduler_hints"] = {}  # scheduler hints are not stored: Nova's value for none
    return view


def volumes_attached(volumes: Sequence[BlockDevice], version: Version) -> list[JSON]:
    """Nova's ``os-extended-volumes:volumes_attached``: each volume's id, and from 2.3
    whether it goes with the server."""
    shown: list[JSON] = []
    for device in volumes:
        item: JSON = {"id": device.volume_id}
        if version.at_least("2.3"):
            item["delete_on_termination"] = device.delete_on_termination
        shown.append(item)
    return shown


def _extended(server: Server, version: Version, volumes: Sequence[BlockDevice]) -> JSON:
    return {
        "config_drive": "True" if server.config_drive else "",
        "security_groups": [{"name": "default"}],
        "OS-EXT-AZ:availability_zone": "nova",
        "OS-EXT-STS:vm_state": server.vm_state,
        "OS-EXT-STS:task_state": server.task_state,
        "OS-EXT-STS:power_state": server.power_state,
        "OS-SRV-USG:launched_at": microtime(server.launched_at),
        "OS-SRV-USG:terminated_at": microtime(server.terminated_at),
        "os-extended-volumes:volumes_attached": volumes_attached(volumes, version),
    }


def _admin_attributes(server: Server, version: Version, *, user_data: bool) -> JSON:
    """Nova's extended server attributes (policy: admin)."""
    view: JSON = {
        "OS-EXT-SRV-ATTR:host": server.host,
        "OS-EXT-SRV-ATTR:hypervisor_hostname": server.node,
        "OS-EXT-SRV-ATTR:instance_name": server.domain_name,
    }
    if version >= _v("2.3"):
        view.update(
            {
                "OS-EXT-SRV-ATTR:hostname": server.hostname,
                "OS-EXT-SRV-ATTR:reservation_id": "",
                "OS-EXT-SRV-ATTR:launch_index": 0,
                "OS-EXT-SRV-ATTR:kernel_id": "",
                "OS-EXT-SRV-ATTR:ramdisk_id": "",
                "OS-EXT-SRV-ATTR:root_device_name": "/dev/vda",
            }
        )
        if user_data:
            view["OS-EXT-SRV-ATTR:user_data"] = server.user_data
    return view


def server_show(
    server: Server,
    base: str,
    version: Version,
    fault: Fault | None,
    *,
    is_admin: bool,
    volumes: Sequence[BlockDevice] = (),
) -> JSON:
    """GET /servers/{id}."""
    show = _Show(full=True, key_name=True, server_groups=version >= _v("2.71"), ext_user_data=True)
    return _server_view(server, base, version, fault, is_admin=is_admin, show=show, volumes=volumes)


def server_detail(
    server: Server,
    base: str,
    version: Version,
    fault: Fault | None,
    *,
    is_admin: bool,
    volumes: Sequence[BlockDevice] = (),
) -> JSON:
    """One server of GET /servers/detail (no server groups, unlike the single GET)."""
    show = _Show(full=True, key_name=True, server_groups=False, ext_user_data=True)
    return _server_view(server, base, version, fault, is_admin=is_admin, show=show, volumes=volumes)


def server_rebuilt(
    server: Server,
    base: str,
    version: Version,
    *,
    is_admin: bool,
    volumes: Sequence[BlockDevice] = (),
) -> JSON:
    """The rebuild 202's server (without adminPass): the base view below 2.75, the GET view
    from 2.75, and user_data (not OS-EXT-SRV-ATTR:user_data) from 2.57."""
    show = _Show(
        full=version >= _v("2.75"),
        key_name=version >= _v("2.54"),
        server_groups=version >= _v("2.71"),
        ext_user_data=False,
    )
    view = _server_view(server, base, version, None, is_admin=is_admin, show=show, volumes=volumes)
    if version >= _v("2.57"):
        view["user_data"] = server.user_data
    return view


def flavor_brief(flavor: Flavor, base: str, version: Version) -> JSON:
    view: JSON = {"id": flavor.id, "name": flavor.name, "links": _links(base, "flavors", flavor.id)}
    if version >= _v("2.55"):
        view["description"] = flavor.description
    return view


def flavor_detail(flavor: Flavor, base: str, version: Version) -> JSON:
    view = flavor_brief(flavor, base, version)
    view.update(
        {
            "ram": flavor.ram,
            "disk": flavor.disk,
            "vcpus": flavor.vcpus,
            "swap": flavor.swap or "",
            "rxtx_factor": flavor.rxtx_factor,
            "OS-FLV-EXT-DATA:ephemeral": flavor.ephemeral,
            "OS-FLV-DISABLED:disabled": flavor.disabled,
            "os-flavor-access:is_public": flavor.is_public,
        }
    )
    if version >= _v("2.61"):
        view["extra_specs"] = dict(flavor.extra_specs)
    return view


def keypair_view(keypair: KeyPair, version: Version) -> JSON:
    view: JSON = {
        "name": keypair.name,
        "public_key": keypair.public_key,
        "fingerprint": keypair.fingerprint,
    }
    if version >= _v("2.2"):
        view["type"] = keypair.type
    return view


def action_view(
    action: InstanceAction,
    version: Version,
    *,
    events: str = "none",
    show_details: bool = False,
) -> JSON:
    """An instance action; ``events``: ``none``, ``public`` (no traceback, no host: what a
    non-admin sees from 2.51) or ``full`` (admins)."""
    view: JSON = {
        "action": action.action,
        "instance_uuid": action.server_id,
        "request_id": action.request_id,
        "user_id": action.user_id,
        "project_id": action.project_id,
        "start_time": microtime(action.start_time),
        "message": action.message,
    }
    if version >= _v("2.58"):
        view["updated_at"] = microtime(action.updated_at)
    if events == "none":
        return view
    items = []
    for event in action.events:
        item: JSON = {
            "event": event.event,
            "start_time": microtime(event.start_time),
            "finish_time": microtime(event.finish_time),
            "result": event.result,
        }
        if events == "full":
            item["traceback"] = event.traceback
            if version >= _v("2.62"):
                item["host"] = event.host
        if version >= _v("2.62"):
            item["hostId"] = hashlib.sha224((action.project_id + event.host).encode()).hexdigest()
        if show_details and version >= _v("2.84"):
            item["details"] = event.details
        items.append(item)
    view["events"] = items
    return view


def image_view(image: Image) -> JSON:
    """A Glance v2 image object (custom properties flattened into it, as Glance does)."""
    view: JSON = dict(image.properties)
    view.update(
        {
            "id": image.id,
            "name": image.name,
            "status": image.status,
            "visibility": image.visibility,
            "protected": image.protected,
            "os_hidden": False,
            "checksum": image.checksum,
            "os_hash_algo": image.os_hash_algo,
            "os_hash_value": image.os_hash_value,
            "owner": image.owner,
            "size": image.size,
            "virtual_size": image.virtual_size,
            "min_ram": image.min_ram,
            "min_disk": image.min_disk,
            "disk_format": image.disk_format,
            "container_format": image.container_format,
            "created_at": isotime(image.created_at),
            "updated_at": isotime(image.updated_at),
            "tags": [],
            "self": f"/v2/images/{image.id}",
            "file": f"/v2/images/{image.id}/file",
            "schema": "/v2/schemas/image",
        }
    )
    return view


# -- JSON schemas of these views, for the OpenAPI document ---------------------------------------
# Each lists the keys every microversion has (later ones add keys: objects stay open).

_STR: JSON = {"type": "string"}
_INT: JSON = {"type": "integer"}
_BOOL: JSON = {"type": "boolean"}


def _nullable(schema: JSON) -> JSON:
    return {"anyOf": [schema, {"type": "null"}]}


def _array(items: JSON) -> JSON:
    return {"type": "array", "items": items}


def _object(required: JSON, optional: JSON | None = None) -> JSON:
    return {
        "type": "object",
        "required": list(required),
        "properties": {**required, **(optional or {})},
    }


def envelope(key: str, schema: JSON, optional: JSON | None = None) -> JSON:
    """``{key: schema}``, the way Nova wraps every body."""
    return _object({key: schema}, optional)


_LINKS = _array(_object({"rel": _STR, "href": _STR}))
# Nova's statuses; rebuildd shows a subset of them today.
_STATUSES = [
    "ACTIVE", "BUILD", "DELETED", "ERROR", "HARD_REBOOT", "MIGRATING", "PASSWORD", "PAUSED",
    "REBOOT", "REBUILD", "RESCUE", "RESIZE", "REVERT_RESIZE", "SHELVED", "SHELVED_OFFLOADED",
    "SHUTOFF", "SOFT_DELETED", "SUSPENDED", "UNKNOWN", "VERIFY_RESIZE",
]  # fmt: skip

VERSION_SCHEMA = _object(
    {"id": _STR, "status": _STR, "links": _LINKS},
    {"version": _STR, "min_version": _STR, "updated": _STR},
)
SERVER_BRIEF_SCHEMA = _object({"id": _STR, "name": _STR, "links": _LINKS})
SERVER_SCHEMA = _object(
    {
        "id": _STR,
        "name": _STR,
        "status": {"type": "string", "enum": _STATUSES},
        "tenant_id": _STR,
        "user_id": _STR,
        "metadata": {"type": "object", "additionalProperties": _STR},
        "hostId": _STR,
        "image": {"oneOf": [_object({"id": _STR, "links": _LINKS}), {"type": "string"}]},
        "flavor": {"type": "object"},
        "created": _STR,
        "updated": _STR,
        "addresses": {"type": "object"},
        "accessIPv4": _STR,
        "accessIPv6": _STR,
        "links": _LINKS,
        "OS-DCF:diskConfig": {"type": "string", "enum": ["AUTO", "MANUAL"]},
        "progress": _INT,
    },
    {
        "fault": _object({"code": _INT, "message": _STR}),
        "OS-EXT-STS:vm_state": _STR,
        "OS-EXT-STS:task_state": _nullable(_STR),
        "OS-EXT-STS:power_state": _INT,
        "key_name": _nullable(_STR),
        "description": _nullable(_STR),
        "locked": _BOOL,
    },
)
CREATED_SERVER_SCHEMA = _object(
    {"id": _STR, "links": _LINKS, "OS-DCF:diskConfig": _STR, "adminPass": _STR},
    {"security_groups": _array(_object({"name": _STR}))},
)
FLAVOR_BRIEF_SCHEMA = _object(
    {"id": _STR, "name": _STR, "links": _LINKS}, {"description": _nullable(_STR)}
)
FLAVOR_SCHEMA = _object(
    {
        "id": _STR,
        "name": _STR,
        "links": _LINKS,
        "ram": _INT,
        "disk": _INT,
        "vcpus": _INT,
        "swap": {"anyOf": [_INT, {"const": ""}]},  # Nova shows no swap as ""
        "rxtx_factor": {"type": "number"},
        "OS-FLV-EXT-DATA:ephemeral": _INT,
        "OS-FLV-DISABLED:disabled": _BOOL,
        "os-flavor-access:is_public": _BOOL,
    },
    {"description": _nullable(_STR)},
)
KEYPAIR_SCHEMA = _object(
    {"name": _STR, "public_key": _STR, "fingerprint": _STR},
    {"type": {"type": "string", "enum": ["ssh", "x509"]}, "user_id": _STR},
)
ACTION_SCHEMA = _object(
    {
        "action": _STR,
        "instance_uuid": _STR,
        "request_id": _STR,
        "user_id": _STR,
        "project_id": _STR,
        "start_time": _STR,
        "message": _nullable(_STR),
    },
    {
        "events": _array(
            _object(
                {
                    "event": _STR,
                    "start_time": _nullable(_STR),
                    "finish_time": _nullable(_STR),
                    "result": _nullable(_STR),
                },
                {"traceback": _nullable(_STR)},  # not shown to non-admins from 2.51
            )
        )
    },
)
IMAGE_SCHEMA = _object(
    {
        "id": _STR,
        "name": _nullable(_STR),
        "status": {
            "type": "string",
            "enum": ["queued", "saving", "active", "killed", "deleted", "deactivated"],
        },
        "visibility": {"type": "string", "enum": ["public", "private", "shared", "community"]},
        "protected": _BOOL,
        "checksum": _nullable(_STR),
        "size": _nullable(_INT),
        "virtual_size": _nullable(_INT),
        "min_ram": _INT,
        "min_disk": _INT,
        "disk_format": _nullable(_STR),
        "container_format": _nullable(_STR),
        "created_at": _STR,
        "updated_at": _STR,
        "tags": _array(_STR),
        "self": _STR,
        "file": _STR,
        "schema": _STR,
    }
)

# The bodies, as the routes answer them.
VERSIONS_BODY = envelope("versions", _array(VERSION_SCHEMA))
VERSION_BODY = envelope("version", VERSION_SCHEMA)
SERVER_LIST_BODY = envelope("servers", _array(SERVER_BRIEF_SCHEMA), {"servers_links": _LINKS})
SERVER_DETAIL_LIST_BODY = envelope("servers", _array(SERVER_SCHEMA), {"servers_links": _LINKS})
SERVER_BODY = envelope("server", SERVER_SCHEMA)
CREATED_SERVER_BODY = envelope("server", CREATED_SERVER_SCHEMA)
ACTION_LIST_BODY = envelope("instanceActions", _array(ACTION_SCHEMA))
ACTION_BODY = envelope("instanceAction", ACTION_SCHEMA)
FLAVOR_LIST_BODY = envelope("flavors", _array(FLAVOR_BRIEF_SCHEMA))
FLAVOR_DETAIL_LIST_BODY = envelope("flavors", _array(FLAVOR_SCHEMA))
FLAVOR_BODY = envelope("flavor", FLAVOR_SCHEMA)
KEYPAIR_LIST_BODY = envelope("keypairs", _array(envelope("keypair", KEYPAIR_SCHEMA)))
KEYPAIR_BODY = envelope("keypair", KEYPAIR_SCHEMA)
IMAGE_LIST_BODY = _object(
    {"images": _array(IMAGE_SCHEMA), "first": _STR, "schema": _STR}, {"next": _STR}
)
IMAGE_BODY = IMAGE_SCHEMA


def openapi_json(schema: JSON, status: int = 200) -> dict[int | str, JSON]:
    """An OpenAPI ``responses`` entry: ``status`` with a JSON body of ``schema``."""
    return {status: {"content": {"application/json": {"schema": schema}}}}
