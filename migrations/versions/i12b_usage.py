"""Usage per owner: images, realtime frames and GPU-seconds per owner, model, UTC day and source;
an index on webhook_deliveries.status (the metrics count the pending outbox at each scrape).

Revision ID: i12b_usage
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "i12b_usage"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "usage",
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("images", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("frames", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("gpu_seconds", sa.Float(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("owner", "model", "day", "source", name=op.f("pk_usage")),
    )
    op.create_index(op.f("ix_webhook_deliveries_status"), "webhook_deliveries", ["status"])


def downgrade() -> None:
    op.drop_index(op.f("ix_webhook_deliveries_status"), table_name="webhook_deliveries")
    op.drop_table("usage")
