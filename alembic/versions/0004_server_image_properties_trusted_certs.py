"""The image properties a server keeps (Nova's image_* system metadata) and its trusted image
certificate IDs (2.63+).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24 00:30:00
"""

from __future__ import annotations

import sqlalchemy as sa

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("servers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("image_properties", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("trusted_certs", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("servers", schema=None) as batch_op:
        batch_op.drop_column("trusted_certs")
        batch_op.drop_column("image_properties")
