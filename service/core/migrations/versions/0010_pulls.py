"""pulls: an admin's request to fetch a study from the PACS (C-FIND, C-MOVE) and what came of it

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-11 10:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pulls",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("requested_by", sa.String(length=64), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("accession_number", sa.String(length=16), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("studies_found", sa.Integer(), nullable=False),
        sa.Column("instances_moved", sa.Integer(), nullable=False),
        sa.Column("instances_failed", sa.Integer(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("pulls", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_pulls_status"), ["status"], unique=False)
        batch_op.create_index(batch_op.f("ix_pulls_created_at"), ["created_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("pulls", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_pulls_created_at"))
        batch_op.drop_index(batch_op.f("ix_pulls_status"))
    op.drop_table("pulls")
