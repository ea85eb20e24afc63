"""The SQLModel tables behind the Store.

Owns the schema (and so what the Alembic migrations must build); it must not hold queries or
policy — storage.py does. tests/test_migrations.py fails if a migration and these tables
disagree.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, Column, Index, UniqueConstraint
from sqlmodel import Field, SQLModel


def _json(name: str) -> Any:
    return Field(default_factory=dict, sa_column=Column(name, JSON, nullable=False))


class FlavorRow(SQLModel, table=True):
    __tablename__ = "flavors"

    id: str = Field(primary_key=True, max_length=255)
    name: str = Field(max_length=255, unique=True)
    vcpus: int
    ram: int
    disk: int
    ephemeral: int = 0
    swap: int = 0
    rxtx_factor: float = 1.0
    is_public: bool = True
    disabled: bool = False
    description: str | None = Field(default=None, max_length=65535)
    extra_specs: dict[str, str] = _json("extra_specs")
    created_at: dt.datetime


class ImageRow(SQLModel, table=True):
    __tablename__ = "images"

    id: str = Field(primary_key=True, max_length=36)
    name: str | None = Field(default=None, max_length=255, index=True)
    status: str = Field(max_length=30)
    disk_format: str | None = Field(default=None, max_length=30)
    container_format: str | None = Field(default=None, max_length=30)
    size: int | None = None
    virtual_size: int | None = None
    checksum: str | None = Field(default=None, max_length=32)
    os_hash_algo: str | None = Field(default=None, max_length=64)
    os_hash_value: str | None = Field(default=None, max_length=128)
    min_disk: int = 0
    min_ram: int = 0
    visibility: str = Field(default="public", max_length=20)
    protected: bool = False
    owner: str | None = Field(default=None, max_length=255)
    properties: dict[str, Any] = _json("properties")
    created_at: dt.datetime
    updated_at: dt.datetime


class KeyPairRow(SQLModel, table=True):
    __tablename__ = "key_pairs"
    __table_args__ = (UniqueConstraint("user_id", "name", name="uq_key_pairs_user_id_name"),)

    id: int | None = Field(default=None, primary_key=True)
    user_id: str = Field(max_length=255)
    name: str = Field(max_length=255)
    public_key: str = Field(max_length=65535)
    fingerprint: str = Field(max_length=255)
    type: str = Field(default="ssh", max_length=10)
    created_at: dt.datetime


class ServerRow(SQLModel, table=True):
    __tablename__ = "servers"
    __table_args__ = (
        Index("ix_servers_project_deleted_created", "project_id", "deleted", "created_at"),
    )

    id: str = Field(primary_key=True, max_length=36)
    name: str = Field(max_length=255)
    project_id: str = Field(max_length=255)
    user_id: str = Field(max_length=255)
    image_ref: str = Field(max_length=255)
    flavor_id: str = Field(max_length=255)
    # The flavor as it was at boot, as Nova keeps it with the instance.
    flavor: dict[str, Any] = _json("flavor")
    vm_state: str = Field(max_length=255)
    task_state: str | None = Field(default=None, max_length=255)
    power_state: int = 0
    host: str = Field(max_length=255)
    node: str = Field(max_length=255)
    domain_name: str = Field(max_length=255, unique=True)
    hostname: str = Field(max_length=255)
    server_metadata: dict[str, str] = _json("metadata")
    key_name: str | None = Field(default=None, max_length=255)
    key_data: str | None = Field(default=None, max_length=65535)
    user_data: str | None = Field(default=None, max_length=65535)
    description: str | None = Field(default=None, max_length=255)
    access_ip_v4: str = Field(default="", max_length=39)
    access_ip_v6: str = Field(default="", max_length=39)
    auto_disk_config: bool = False
    locked: bool = False
    locked_reason: str | None = Field(default=None, max_length=255)
    locked_by: str | None = Field(default=None, max_length=16)  # owner | admin, as Nova
    config_drive: bool = False
    progress: int = 0
    launched_at: dt.datetime | None = None
    terminated_at: dt.datetime | None = None
    created_at: dt.datetime
    updated_at: dt.datetime
    deleted: bool = False
    deleted_at: dt.datetime | None = None
    # Nova's image_* system metadata: the image's properties at boot or at the last rebuild.
    image_properties: dict[str, str] | None = Field(
        default=None, sa_column=Column("image_properties", JSON)
    )
    # Trusted image certificate IDs (2.63+); None when the server has none.
    trusted_certs: list[str] | None = Field(default=None, sa_column=Column("trusted_certs", JSON))


class BlockDeviceRow(SQLModel, table=True):
    __tablename__ = "block_device_mappings"

    id: str = Field(primary_key=True, max_length=36)
    server_id: str = Field(foreign_key="servers.id", index=True, max_length=36)
    boot_index: int | None = None
    source_type: str = Field(max_length=32)
    destination_type: str = Field(max_length=32)
    device_name: str = Field(max_length=32)
    image_id: str | None = Field(default=None, max_length=36)
    volume_id: str | None = Field(default=None, max_length=36)
    path: str | None = Field(default=None, max_length=4096)
    disk_bus: str = Field(default="virtio", max_length=32)
    device_type: str = Field(default="disk", max_length=32)
    guest_format: str | None = Field(default=None, max_length=32)
    size_mib: int | None = None
    owned: bool = True
    attachment_id: str | None = Field(default=None, max_length=36)
    connection_info: dict[str, Any] | None = Field(
        default=None, sa_column=Column("connection_info", JSON)
    )
    delete_on_termination: bool = False
    tag: str | None = Field(default=None, max_length=255)
    created_at: dt.datetime
    updated_at: dt.datetime


class VolumeRow(SQLModel, table=True):
    """A local volume (a file under ``<state_dir>/volumes``) with Cinder's status."""

    __tablename__ = "volumes"
    __table_args__ = (Index("ix_volumes_project_created", "project_id", "created_at"),)

    id: str = Field(primary_key=True, max_length=36)
    name: str | None = Field(default=None, max_length=255)
    description: str | None = Field(default=None, max_length=255)
    size: int
    status: str = Field(max_length=255)
    project_id: str = Field(max_length=255)
    user_id: str = Field(max_length=255)
    bootable: bool = False
    multiattach: bool = False
    volume_type: str | None = Field(default=None, max_length=255)
    availability_zone: str = Field(default="nova", max_length=255)
    volume_image_metadata: dict[str, str] = _json("volume_image_metadata")
    created_at: dt.datetime
    updated_at: dt.datetime


class VolumeAttachmentRow(SQLModel, table=True):
    __tablename__ = "volume_attachments"

    id: str = Field(primary_key=True, max_length=36)
    volume_id: str = Field(foreign_key="volumes.id", index=True, max_length=36)
    server_id: str = Field(max_length=36, index=True)
    status: str = Field(max_length=255)  # Cinder's attach_status: reserved|attaching|attached
    attach_mode: str = Field(default="rw", max_length=36)
    connector: dict[str, Any] | None = Field(default=None, sa_column=Column("connector", JSON))
    connection_info: dict[str, Any] | None = Field(
        default=None, sa_column=Column("connection_info", JSON)
    )
    mountpoint: str | None = Field(default=None, max_length=255)
    attached_at: dt.datetime | None = None
    created_at: dt.datetime


class InstanceActionRow(SQLModel, table=True):
    """An instance action, and the journal of the job that carries it out (the saga)."""

    __tablename__ = "instance_actions"
    __table_args__ = (
        Index("ix_instance_actions_server_start", "server_id", "start_time"),
        UniqueConstraint("server_id", "idempotency_key", name="uq_instance_actions_idempotency"),
    )

    id: int | None = Field(default=None, primary_key=True)
    server_id: str = Field(foreign_key="servers.id", max_length=36)
    action: str = Field(max_length=255)
    request_id: str = Field(max_length=255, unique=True)
    user_id: str = Field(max_length=255)
    project_id: str = Field(max_length=255)
    start_time: dt.datetime
    finish_time: dt.datetime | None = None
    message: str | None = Field(default=None, max_length=255)
    updated_at: dt.datetime
    # running -> cleaning -> done | rolled_back | failed; None for actions without a job.
    job_state: str | None = Field(default=None, max_length=16, index=True)
    # What a restarted daemon needs to rebuild the job's context.
    job_params: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    # Steps started and done, and the facts their undos need, saved at every step boundary.
    journal: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    idempotency_key: str | None = Field(default=None, max_length=255)
    # The first answer, replayed to a repeat of the same idempotency key.
    response: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))


class InstanceActionEventRow(SQLModel, table=True):
    __tablename__ = "instance_action_events"

    id: int | None = Field(default=None, primary_key=True)
    action_id: int = Field(foreign_key="instance_actions.id", index=True)
    event: str = Field(max_length=255)
    start_time: dt.datetime
    finish_time: dt.datetime | None = None
    result: str | None = Field(default=None, max_length=255)
    traceback: str | None = Field(default=None, max_length=65535)
    details: str | None = Field(default=None, max_length=65535)
    host: str = Field(max_length=255)


class InstanceFaultRow(SQLModel, table=True):
    __tablename__ = "instance_faults"

    id: int | None = Field(default=None, primary_key=True)
    server_id: str = Field(foreign_key="servers.id", index=True, max_length=36)
    code: int
    message: str = Field(max_length=255)
    details: str = Field(default="", max_length=65535)
    host: str = Field(max_length=255)
    created_at: dt.datetime


class NotificationRow(SQLModel, table=True):
    """The outbox: every versioned notification, for a relay (or an operator) to read."""

    __tablename__ = "notifications"

    id: int | None = Field(default=None, primary_key=True)
    event_type: str = Field(max_length=255, index=True)
    priority: str = Field(max_length=16)
    publisher_id: str = Field(max_length=255)
    server_id: str | None = Field(default=None, max_length=36, index=True)
    payload: dict[str, Any] = _json("payload")
    created_at: dt.datetime
    sent_at: dt.datetime | None = None
