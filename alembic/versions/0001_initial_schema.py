"""The initial schema: flavors, images, key pairs, servers, block device mappings,
instance actions and events, faults, and the notifications outbox.

Revision ID: 0001
Revises:
Create Date: 2026-11-23 20:47:15.484531
"""

from __future__ import annotations

import sqlalchemy as sa

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "flavors",
        sa.Column("id", sa.String(length=255), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("vcpus", sa.Integer(), nullable=False),
        sa.Column("ram", sa.Integer(), nullable=False),
        sa.Column("disk", sa.Integer(), nullable=False),
        sa.Column("ephemeral", sa.Integer(), nullable=False),
        sa.Column("swap", sa.Integer(), nullable=False),
        sa.Column("rxtx_factor", sa.Float(), nullable=False),
        sa.Column("is_public", sa.Boolean(), nullable=False),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.Column("description", sa.String(length=65535), nullable=True),
        sa.Column("extra_specs", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "images",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=True),
        sa.Column("status", sa.String(length=30), nullable=False),
        sa.Column("disk_format", sa.String(length=30), nullable=True),
        sa.Column("container_format", sa.String(length=30), nullable=True),
        sa.Column("size", sa.Integer(), nullable=True),
        sa.Column("virtual_size", sa.Integer(), nullable=True),
        sa.Column("checksum", sa.String(length=32), nullable=True),
        sa.Column("os_hash_algo", sa.String(length=64), nullable=True),
        sa.Column("os_hash_value", sa.String(length=128), nullable=True),
        sa.Column("min_disk", sa.Integer(), nullable=False),
        sa.Column("min_ram", sa.Integer(), nullable=False),
        sa.Column("visibility", sa.String(length=20), nullable=False),
        sa.Column("protected", sa.Boolean(), nullable=False),
        sa.Column("owner", sa.String(length=255), nullable=True),
        sa.Column("properties", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_images_name"), ["name"], unique=False)

    op.create_table(
        "key_pairs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.String(length=255), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("public_key", sa.String(length=65535), nullable=False),
        sa.Column("fingerprint", sa.String(length=255), nullable=False),
        sa.Column("type", sa.String(length=10), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("user_id", "name", name="uq_key_pairs_user_id_name"),
    )
    op.create_table(
        "notifications",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("event_type", sa.String(length=255), nullable=False),
        sa.Column("priority", sa.String(length=16), nullable=False),
        sa.Column("publisher_id", sa.String(length=255), nullable=False),
        sa.Column("server_id", sa.String(length=36), nullable=True),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("notifications", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_notifications_event_type"), ["event_type"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_notifications_server_id"), ["server_id"], unique=False)

    op.create_table(
        "servers",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("project_id", sa.String(length=255), nullable=False),
        sa.Column("user_id", sa.String(length=255), nullable=False),
        sa.Column("image_ref", sa.String(length=255), nullable=False),
        sa.Column("flavor_id", sa.String(length=255), nullable=False),
        sa.Column("flavor", sa.JSON(), nullable=False),
        sa.Column("vm_state", sa.String(length=255), nullable=False),
        sa.Column("task_state", sa.String(length=255), nullable=True),
        sa.Column("power_state", sa.Integer(), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("node", sa.String(length=255), nullable=False),
        sa.Column("domain_name", sa.String(length=255), nullable=False),
        sa.Column("hostname", sa.String(length=255), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("key_name", sa.String(length=255), nullable=True),
        sa.Column("key_data", sa.String(length=65535), nullable=True),
        sa.Column("user_data", sa.String(length=65535), nullable=True),
        sa.Column("description", sa.String(length=255), nullable=True),
        sa.Column("access_ip_v4", sa.String(length=39), nullable=False),
        sa.Column("access_ip_v6", sa.String(length=39), nullable=False),
        sa.Column("auto_disk_config", sa.Boolean(), nullable=False),
        sa.Column("locked", sa.Boolean(), nullable=False),
        sa.Column("locked_reason", sa.String(length=255), nullable=True),
        sa.Column("config_drive", sa.Boolean(), nullable=False),
        sa.Column("progress", sa.Integer(), nullable=False),
        sa.Column("launched_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("terminated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("domain_name"),
    )
    with op.batch_alter_table("servers", schema=None) as batch_op:
        batch_op.create_index(
            "ix_servers_project_deleted_created",
            ["project_id", "deleted", "created_at"],
            unique=False,
        )

    op.create_table(
        "block_device_mappings",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("server_id", sa.String(length=36), nullable=False),
        sa.Column("boot_index", sa.Integer(), nullable=True),
        sa.Column("source_type", sa.String(length=32), nullable=False),
        sa.Column("destination_type", sa.String(length=32), nullable=False),
        sa.Column("device_name", sa.String(length=32), nullable=False),
        sa.Column("image_id", sa.String(length=36), nullable=True),
        sa.Column("volume_id", sa.String(length=36), nullable=True),
        sa.Column("path", sa.String(length=4096), nullable=True),
        sa.Column("disk_bus", sa.String(length=32), nullable=False),
        sa.Column("device_type", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["server_id"],
            ["servers.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("block_device_mappings", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_block_device_mappings_server_id"), ["server_id"], unique=False
        )

    op.create_table(
        "instance_actions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("server_id", sa.String(length=36), nullable=False),
        sa.Column("action", sa.String(length=255), nullable=False),
        sa.Column("request_id", sa.String(length=255), nullable=False),
        sa.Column("user_id", sa.String(length=255), nullable=False),
        sa.Column("project_id", sa.String(length=255), nullable=False),
        sa.Column("start_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finish_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("message", sa.String(length=255), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["server_id"],
            ["servers.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("request_id"),
    )
    with op.batch_alter_table("instance_actions", schema=None) as batch_op:
        batch_op.create_index(
            "ix_instance_actions_server_start", ["server_id", "start_time"], unique=False
        )

    op.create_table(
        "instance_faults",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("server_id", sa.String(length=36), nullable=False),
        sa.Column("code", sa.Integer(), nullable=False),
        sa.Column("message", sa.String(length=255), nullable=False),
        sa.Column("details", sa.String(length=65535), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["server_id"],
            ["servers.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("instance_faults", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_instance_faults_server_id"), ["server_id"], unique=False
        )

    op.create_table(
        "instance_action_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("action_id", sa.Integer(), nullable=False),
        sa.Column("event", sa.String(length=255), nullable=False),
        sa.Column("start_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finish_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("result", sa.String(length=255), nullable=True),
        sa.Column("traceback", sa.String(length=65535), nullable=True),
        sa.Column("details", sa.String(length=65535), nullable=True),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.ForeignKeyConstraint(
            ["action_id"],
            ["instance_actions.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("instance_action_events", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_instance_action_events_action_id"), ["action_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("instance_action_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_instance_action_events_action_id"))

    op.drop_table("instance_action_events")
    with op.batch_alter_table("instance_faults", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_instance_faults_server_id"))

    op.drop_table("instance_faults")
    with op.batch_alter_table("instance_actions", schema=None) as batch_op:
        batch_op.drop_index("ix_instance_actions_server_start")

    op.drop_table("instance_actions")
    with op.batch_alter_table("block_device_mappings", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_block_device_mappings_server_id"))

    op.drop_table("block_device_mappings")
    with op.batch_alter_table("servers", schema=None) as batch_op:
        batch_op.drop_index("ix_servers_project_deleted_created")

    op.drop_table("servers")
    with op.batch_alter_table("notifications", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_notifications_server_id"))
        batch_op.drop_index(batch_op.f("ix_notifications_event_type"))

    op.drop_table("notifications")
    op.drop_table("key_pairs")
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_images_name"))

    op.drop_table("images")
    op.drop_table("flavors")
