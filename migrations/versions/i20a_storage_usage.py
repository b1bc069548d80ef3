"""Storage usage: the bytes each owner keeps in storage (uploads and stored inputs), one row per owner.

Kept with the writes under the owner's storage lock (``db.storage_usage``), so a quota check is one row
read instead of a LIST of the owner's objects. An owner without a row is counted once, by a LIST, on its
first write after this upgrade.

Revision ID: i20a_storage_usage
Revises: i17_worker_metrics_url
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "i20a_storage_usage"
down_revision: str | Sequence[str] | None = "i17_worker_metrics_url"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "storage_usage",
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("bytes", sa.BigInteger(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("owner", name=op.f("pk_storage_usage")),
    )


def downgrade() -> None:
    op.drop_table("storage_usage")
