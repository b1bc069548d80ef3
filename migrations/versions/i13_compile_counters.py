"""Workers: compile counters (``FARM_COMPILE``), kept fresh by the heartbeat.

``recompiles``: graphs torch.compile built after the worker's warm-up (0 in steady state);
``cold_renders``: micro-batches that ran uncompiled since (a shape not warmed, a request with LoRAs).

Revision ID: i13_compile_counters
Revises: i10b_webhooks
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "i13_compile_counters"
down_revision: str | Sequence[str] | None = "i10b_webhooks"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("recompiles", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("cold_renders", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("cold_renders")
        batch.drop_column("recompiles")
