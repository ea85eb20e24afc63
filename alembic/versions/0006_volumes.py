"""Volumes: local volumes with Cinder's statuses, their attachments, and the volume columns of
block device mappings (Nova's attachment_id, connection_info, delete_on_termination, tag).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-08 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "volumes",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=True),
        sa.Column("description", sa.String(length=255), nullable=True),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=255), nullable=False),
        sa.Column("project_id", sa.String(length=255), nullable=False),
        sa.Column("user_id", sa.String(length=255), nullable=False),
        sa.Column("bootable", sa.Boolean(), nullable=False),
        sa.Column("multiattach", sa.Boolean(), nullable=False),
        sa.Column("volume_type", sa.String(length=255), nullable=True),
        sa.Column("availability_zone", sa.String(length=255), nullable=False),
        sa.Column("volume_image_metadata", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_volumes_project_created", "volumes", ["project_id", "created_at"], unique=False
    )
    op.create_table(
        "volume_attachments",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("volume_id", sa.String(length=36), nullable=False),
        sa.Column("server_id", sa.String(length=36), nullable=False),
        sa.Column("status", sa.String(length=255), nullable=False),
        sa.Column("attach_mode", sa.String(length=36), nullable=False),
        sa.Column("connector", sa.JSON(), nullable=True),
        sa.Column("connection_info", sa.JSON(), nullable=True),
        sa.Column("mountpoint", sa.String(length=255), nullable=True),
        sa.Column("attached_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["volume_id"], ["volumes.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        op.f("ix_volume_attachments_volume_id"), "volume_attachments", ["volume_id"], unique=False
    )
    op.create_index(
        op.f("ix_volume_attachments_server_id"), "volume_attachments", ["server_id"], unique=False
    )
    with op.batch_alter_table("block_device_mappings", schema=None) as batch_op:
        batch_op.add_column(sa.Column("attachment_id", sa.String(length=36), nullable=True))
        batch_op.add_column(sa.Column("connection_info", sa.JSON(), nullable=True))
        batch_op.add_column(
            sa.Column(
                "delete_on_termination", sa.Boolean(), nullable=False, server_default=sa.false()
            )
        )
        batch_op.add_column(sa.Column("tag", sa.String(length=255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("block_device_mappings", schema=None) as batch_op:
        batch_op.drop_column("tag")
        batch_op.drop_column("delete_on_termination")
        batch_op.drop_column("connection_info")
        batch_op.drop_column("attachment_id")
    op.drop_index(op.f("ix_volume_attachments_server_id"), table_name="volume_attachments")
    op.drop_index(op.f("ix_volume_attachments_volume_id"), table_name="volume_attachments")
    op.drop_table("volume_attachments")
    op.drop_index("ix_volumes_project_created", table_name="volumes")
    op.drop_table("volumes")
