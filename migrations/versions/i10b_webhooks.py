"""Webhook outbox: the body is built when a delivery is attempted, not stored; attempts hold a lease.

``body`` becomes nullable (new rows leave it NULL; a row written before keeps its stored body);
``leased_until`` marks a row an attempt is under way for, so that the webhooks of one owner in
flight at once can be counted and capped.

Revision ID: i10b_webhooks
Revises: i12b_usage
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "i10b_webhooks"
down_revision: str | Sequence[str] | None = "i12b_usage"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JSON = sa.JSON().with_variant(sa.dialects.postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("webhook_deliveries") as batch:
        batch.alter_column("body", existing_type=_JSON, nullable=True)
        batch.add_column(sa.Column("leased_until", sa.DateTime(timezone=True), nullable=True))
        batch.create_index("ix_webhook_deliveries_owner_status", ["owner", "status"])


def downgrade() -> None:
    with op.batch_alter_table("webhook_deliveries") as batch:
        batch.drop_index("ix_webhook_deliveries_owner_status")
        batch.drop_column("leased_until")
        batch.alter_column("body", existing_type=_JSON, nullable=True)
