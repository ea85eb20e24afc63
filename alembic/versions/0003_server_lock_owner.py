"""Who locked a server (owner or admin), for Nova's unlock_override rule.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 22:11:41.431767
"""

from __future__ import annotations

import sqlalchemy as sa

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("servers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("locked_by", sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("servers", schema=None) as batch_op:
        batch_op.drop_column("locked_by")
