"""The action journal: job state, parameters and step journal of each instance action
(the persisted saga that restart recovery reads), and idempotency keys with their first answer.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 21:02:02.845422
"""

from __future__ import annotations

import sqlalchemy as sa

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instance_actions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("job_state", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("job_params", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("journal", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("idempotency_key", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("response", sa.JSON(), nullable=True))
        batch_op.create_index(
            batch_op.f("ix_instance_actions_job_state"), ["job_state"], unique=False
        )
        batch_op.create_unique_constraint(
            "uq_instance_actions_idempotency", ["server_id", "idempotency_key"]
        )


def downgrade() -> None:
    with op.batch_alter_table("instance_actions", schema=None) as batch_op:
        batch_op.drop_constraint("uq_instance_actions_idempotency", type_="unique")
        batch_op.drop_index(batch_op.f("ix_instance_actions_job_state"))
        batch_op.drop_column("response")
        batch_op.drop_column("idempotency_key")
        batch_op.drop_column("journal")
        batch_op.drop_column("job_params")
        batch_op.drop_column("job_state")
