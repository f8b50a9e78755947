"""the site loop, second part: each job's mode, site operating-point sets, registered bundles and the
candidate bundles' results

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-12 10:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("mode", sa.String(length=8), nullable=True))
    op.create_table(
        "operating_point_sets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("bundle_version", sa.String(length=64), nullable=False),
        sa.Column("thresholds", sa.JSON(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_operating_point_sets_bundle_version", "operating_point_sets", ["bundle_version"])
    op.create_table(
        "bundles",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("registered_by", sa.String(length=64), nullable=False),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("version"),
    )
    op.create_index("ix_bundles_status", "bundles", ["status"])
    op.create_table(
        "job_results",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("bundle_version", sa.String(length=64), nullable=False),
        sa.Column("result", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("job_id", "bundle_version"),
    )
    op.create_index("ix_job_results_job_id", "job_results", ["job_id"])
    op.create_index("ix_job_results_bundle_version", "job_results", ["bundle_version"])


def downgrade() -> None:
    op.drop_index("ix_job_results_bundle_version", table_name="job_results")
    op.drop_index("ix_job_results_job_id", table_name="job_results")
    op.drop_table("job_results")
    op.drop_index("ix_bundles_status", table_name="bundles")
    op.drop_table("bundles")
    op.drop_index("ix_operating_point_sets_bundle_version", table_name="operating_point_sets")
    op.drop_table("operating_point_sets")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("mode")
