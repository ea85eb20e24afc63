"""Local disks besides the root: ephemeral and swap (Nova's guest_format, their size), the
config drive, and disks of an adopted domain that rebuildd leaves alone (owned = false).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 21:30:00
"""

from __future__ import annotations

import sqlalchemy as sa

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("block_device_mappings", schema=None) as batch_op:
        batch_op.add_column(sa.Column("guest_format", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("size_mib", sa.Integer(), nullable=True))
        batch_op.add_column(
            sa.Column("owned", sa.Boolean(), nullable=False, server_default=sa.true())
        )


def downgrade() -> None:
    with op.batch_alter_table("block_device_mappings", schema=None) as batch_op:
        batch_op.drop_column("owned")
        batch_op.drop_column("size_mib")
        batch_op.drop_column("guest_format")
