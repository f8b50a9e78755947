"""delivery due times: retries owned by the database (next_attempt_at, dispatched_at)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29 18:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(batch_op.f("ix_deliveries_next_attempt_at"), ["next_attempt_at"], unique=False)
    # Deliveries that were waiting on a countdown task (or on nothing) are due now: the listener sends them.
    deliveries = sa.table(
        "deliveries",
        sa.column("status", sa.String),
        sa.column("next_attempt_at", sa.DateTime(timezone=True)),
    )
    op.execute(
        deliveries.update()
        .where(deliveries.c.status.in_(["pending", "retrying"]))
        .values(next_attempt_at=sa.func.current_timestamp())
    )


def downgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_deliveries_next_attempt_at"))
        batch_op.drop_column("dispatched_at")
        batch_op.drop_column("next_attempt_at")
