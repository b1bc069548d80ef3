"""Bulk dataset jobs: bulk_jobs, bulk_samples (one row per image), bulk_shards.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "bulk_jobs",
        sa.Column("id", sa.String(128), nullable=False),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("manifest", sa.Text(), nullable=False),
        sa.Column("dest", sa.Text(), nullable=False),
        sa.Column("format", sa.String(16), nullable=False),
        sa.Column("shard_size", sa.Integer(), nullable=False),
        sa.Column("spec", JSON, nullable=False),
        sa.Column("ingested", sa.Integer(), nullable=False),
        sa.Column("manifest_done", sa.Boolean(), nullable=False),
        sa.Column("rows_rejected", sa.Integer(), nullable=False),
        sa.Column("last_row", sa.Integer(), nullable=False),
        sa.Column("runner", sa.String(128), nullable=True),
        sa.Column("runner_until", TIMESTAMP, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.Column("finished_at", TIMESTAMP, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bulk_jobs")),
    )
    op.create_index(op.f("ix_bulk_jobs_owner"), "bulk_jobs", ["owner"])
    op.create_table(
        "bulk_samples",
        sa.Column("bulk_id", sa.String(128), nullable=False),
        sa.Column("idx", sa.Integer(), nullable=False),
        sa.Column("shard", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(16), nullable=False),
        sa.Column("row", sa.Integer(), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("negative_prompt", sa.Text(), nullable=True),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("params", JSON, nullable=False),
        sa.Column("extra", JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("job_id", sa.String(128), nullable=True),
        sa.Column("tries", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["bulk_id"], ["bulk_jobs.id"], name=op.f("fk_bulk_samples_bulk_id_bulk_jobs"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("bulk_id", "idx", name=op.f("pk_bulk_samples")),
    )
    op.create_index(op.f("ix_bulk_samples_bulk_id_status"), "bulk_samples", ["bulk_id", "status"])
    op.create_index(op.f("ix_bulk_samples_bulk_id_shard"), "bulk_samples", ["bulk_id", "shard"])
    op.create_table(
        "bulk_shards",
        sa.Column("bulk_id", sa.String(128), nullable=False),
        sa.Column("shard", sa.Integer(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("stats", JSON, nullable=False),
        sa.Column("written_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(["bulk_id"], ["bulk_jobs.id"], name=op.f("fk_bulk_shards_bulk_id_bulk_jobs"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("bulk_id", "shard", name=op.f("pk_bulk_shards")),
    )


def downgrade() -> None:
    op.drop_table("bulk_shards")
    op.drop_index(op.f("ix_bulk_samples_bulk_id_shard"), table_name="bulk_samples")
    op.drop_index(op.f("ix_bulk_samples_bulk_id_status"), table_name="bulk_samples")
    op.drop_table("bulk_samples")
    op.drop_index(op.f("ix_bulk_jobs_owner"), table_name="bulk_jobs")
    op.drop_table("bulk_jobs")
