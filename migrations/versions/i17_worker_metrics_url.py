"""Workers: where each worker's Prometheus exporter is scraped.

``metrics_url``: ``http://<host>:<port>/metrics`` of the worker's exporter (several workers on one host
each take their own port), NULL when it exports none. ``GET /metrics/targets`` on the API lists the
live ones for Prometheus (``http_sd_configs``).

Revision ID: i17_worker_metrics_url
Revises: i13_compile_counters
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "i17_worker_metrics_url"
down_revision: str | Sequence[str] | None = "i13_compile_counters"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("metrics_url", sa.String(512), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("metrics_url")
