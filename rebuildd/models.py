"""Plain, frozen records passed between the Store, the pipeline and the API views.

Owns the shapes only: no SQL, no HTTP, no libvirt. The Store turns its rows into these, so the
pipeline never holds a live ORM object (and never lazy-loads across an ``await``).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

JSONDict = dict[str, Any]


def utcnow() -> dt.datetime:
    """Aware UTC: every time rebuildd stores is UTC with its offset."""
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, slots=True)
class Flavor:
    id: str
    name: str
    vcpus: int
    ram: int  # MiB
    disk: int  # GiB; 0 means "the image's size"
    ephemeral: int = 0  # GiB
    swap: int = 0  # MiB
    rxtx_factor: float = 1.0
    is_public: bool = True
    disabled: bool = False
    description: str | None = None
    extra_specs: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Image:
    id: str
    name: str | None
    status: str
    disk_format: str | None
    container_format: str | None
    size: int | None
    virtual_size: int | None
    checksum: str | None
    os_hash_algo: str | None
    os_hash_value: str | None
    min_disk: int
    min_ram: int
    visibility: str
    protected: bool
    owner: str | None
    properties: dict[str, Any]
    created_at: dt.datetime
    updated_at: dt.datetime


@dataclass(frozen=True, slots=True)
class KeyPair:
    name: str
    user_id: str
    public_key: str
    fingerprint: str
    type: str
    created_at: dt.datetime


@dataclass(frozen=True, slots=True)
class Fault:
    code: int
    message: str
    details: str
    created_at: dt.datetime


@dataclass(frozen=True, slots=True)
class BlockDevice:
    """One block device mapping; the root disk is the one with ``boot_index == 0``."""

    id: str
    server_id: str
    boot_index: int | None
    source_type: str  # image | blank | volume
    destination_type: str  # local | volume
    device_name: str  # libvirt target, e.g. "vda"
    image_id: str | None
    volume_id: str | None
    path: str | None  # file backing a local disk
    disk_bus: str
    device_type: str  # disk | cdrom
    # Nova's guest_format: "swap" for the swap disk, a filesystem (e.g. "ext4") or None for
    # an ephemeral disk, "iso9660" for the config drive; None for root and volumes.
    guest_format: str | None = None
    size_mib: int | None = None  # local blank disks (ephemeral, swap): their size
    owned: bool = True  # False: a disk rebuildd found on an adopted domain and leaves alone
    # Volumes (source and destination "volume"): the Cinder attachment this mapping holds and
    # the connection_info it returned, as Nova's BDM keeps them.
    attachment_id: str | None = None
    connection_info: dict[str, Any] | None = None
    delete_on_termination: bool = False  # Nova's column; shown from 2.3 (volumes_attached)
    tag: str | None = None  # Nova's device tag (2.49 attach, shown from 2.70)


@dataclass(frozen=True, slots=True)
class VolumeAttachment:
    """One Cinder attachment of a volume to a server (Cinder's ``attach_status``)."""

    id: str
    volume_id: str
    server_id: str
    status: str  # reserved | attaching | attached
    attach_mode: str = "rw"
    connector: dict[str, Any] | None = None
    connection_info: dict[str, Any] | None = None
    mountpoint: str | None = None
    attached_at: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class Volume:
    """A block storage volume, as Cinder shows one."""

    id: str
    name: str | None
    description: str | None
    size: int  # GiB
    # Cinder's: creating, available, reserved, attaching, in-use, detaching, downloading,
    # error, deleting, error_deleting
    status: str
    project_id: str
    user_id: str
    bootable: bool
    multiattach: bool
    volume_type: str | None
    attachments: tuple[VolumeAttachment, ...]
    volume_image_metadata: dict[str, str]
    created_at: dt.datetime
    updated_at: dt.datetime
    availability_zone: str = "nova"


@dataclass(frozen=True, slots=True)
class Server:
    id: str
    name: str
    project_id: str
    user_id: str
    image_ref: str
    flavor: Flavor
    vm_state: str
    task_state: str | None
    power_state: int
    host: str
    node: str
    domain_name: str
    hostname: str
    metadata: dict[str, str]
    key_name: str | None
    key_data: str | None
    user_data: str | None
    description: str | None
    access_ip_v4: str
    access_ip_v6: str
    auto_disk_config: bool
    locked: bool
    locked_reason: str | None
    config_drive: bool
    progress: int
    launched_at: dt.datetime | None
    terminated_at: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime
    deleted: bool = False
    locked_by: str | None = None  # owner | admin
    image_properties: dict[str, str] = field(default_factory=dict)  # imageprops.kept(...)
    trusted_certs: tuple[str, ...] | None = None  # 2.63+ trusted_image_certificates


@dataclass(frozen=True, slots=True)
class ActionEvent:
    event: str
    start_time: dt.datetime
    finish_time: dt.datetime | None
    result: str | None
    traceback: str | None
    details: str | None
    host: str


@dataclass(frozen=True, slots=True)
class InstanceAction:
    id: int
    server_id: str
    action: str
    request_id: str
    user_id: str
    project_id: str
    start_time: dt.datetime
    finish_time: dt.datetime | None
    message: str | None
    updated_at: dt.datetime
    events: tuple[ActionEvent, ...] = ()
    job_state: str | None = None
    job_params: dict[str, Any] | None = None
    journal: dict[str, Any] | None = None
    idempotency_key: str | None = None
    response: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class RequestContext:
    """Who is asking, and under which request id (which becomes the instance-action id)."""

    request_id: str
    user_id: str
    project_id: str
    roles: tuple[str, ...] = ()
    # The caller's Keystone token, in memory only (never journalled): what a volume created
    # for the request is created with, so it is the caller's. None after a restart.
    auth_token: str | None = field(default=None, repr=False, compare=False)

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles


@dataclass(frozen=True, slots=True)
class NewAction:
    """An instance action to record in the same transaction as a state change.

    With ``params`` it carries a job: it is saved as ``running``, and a restarted daemon
    rebuilds the job's context from ``params`` to finish it or roll it back.
    """

    action: str
    request_id: str
    user_id: str
    project_id: str
    message: str | None = None
    params: dict[str, Any] | None = None
    idempotency_key: str | None = None


@dataclass(frozen=True, slots=True)
class Notification:
    """One versioned notification, as kept in the Store's outbox."""

    event_type: str
    priority: str
    publisher_id: str
    server_id: str | None
    payload: dict[str, Any]
