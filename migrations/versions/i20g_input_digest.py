"""Jobs: the digest of the input as the client sent it, which a repeated idempotency key is compared with.

The stored ``input`` is rewritten after admission (data URIs and fetched URLs become ``farm-stored:`` keys),
so a retry with the same key cannot be compared with it. ``input_digest``: SHA-256 of the admitted input's
canonical JSON, before any rewrite; NULL for jobs recorded before this revision (compared as before).

Revision ID: i20g_input_digest
Revises: i20k_bulk_failed
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "i20g_input_digest"
down_revision: str | Sequence[str] | None = "i20k_bulk_failed"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("input_digest", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("input_digest")
