"""Batches (leased units of work) and workers (pool membership, batch size, reload counter).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "batches",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(128), nullable=False),
        sa.Column("k", sa.Integer(), nullable=False),
        sa.Column("indices", JSON, nullable=False),
        sa.Column("model_key", sa.String(64), nullable=False),
        sa.Column("lane", sa.String(16), nullable=False),
        sa.Column("compat", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("worker", sa.String(256), nullable=True),
        sa.Column("lease_expires_at", TIMESTAMP, nullable=True),
        sa.Column("claimed_at", TIMESTAMP, nullable=True),
        sa.Column("finished_at", TIMESTAMP, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_batches_job_id_jobs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_batches")),
        sa.UniqueConstraint("job_id", "k", name=op.f("uq_batches_job_id_k")),
    )
    op.create_index(op.f("ix_batches_model_key_status_compat"), "batches", ["model_key", "status", "compat"])
    op.create_index(op.f("ix_batches_status_lease_expires_at"), "batches", ["status", "lease_expires_at"])
    op.create_table(
        "workers",
        sa.Column("name", sa.String(256), nullable=False),
        sa.Column("model_name", sa.String(256), nullable=False),
        sa.Column("model_key", sa.String(64), nullable=False),
        sa.Column("device", sa.String(32), nullable=False),
        sa.Column("max_batch", sa.Integer(), nullable=False),
        sa.Column("loads", sa.Integer(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", TIMESTAMP, nullable=False),
        sa.Column("heartbeat_at", TIMESTAMP, nullable=False),
        sa.Column("stopped_at", TIMESTAMP, nullable=True),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_workers")),
    )
    op.create_index(op.f("ix_workers_model_key"), "workers", ["model_key"])


def downgrade() -> None:
    op.drop_index(op.f("ix_workers_model_key"), table_name="workers")
    op.drop_table("workers")
    op.drop_index(op.f("ix_batches_status_lease_expires_at"), table_name="batches")
    op.drop_index(op.f("ix_batches_model_key_status_compat"), table_name="batches")
    op.drop_table("batches")
