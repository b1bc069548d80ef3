"""Bulk jobs end (issue 20): runs that ended in an error are counted, and rejected rows keep their reason.

``attempts``: the job's driver runs that ended in an unexpected error since it last stopped cleanly; at
``FARM_BULK_MAX_ATTEMPTS`` the job is FAILED (the new ``BulkStatus``) with the reason in ``error``, instead
of being sent again forever. ``rejections``: the reasons of the first rejected manifest rows (the report).

Revision ID: i20k_bulk_failed
Revises: i20a_storage_usage
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "i20k_bulk_failed"
down_revision: str | Sequence[str] | None = "i20a_storage_usage"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("bulk_jobs") as batch:
        batch.add_column(sa.Column("attempts", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(sa.Column("rejections", JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("bulk_jobs") as batch:
        batch.drop_column("rejections")
        batch.drop_column("attempts")
