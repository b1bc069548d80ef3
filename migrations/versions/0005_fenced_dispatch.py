"""Fenced, ledger-driven dispatch: batch claim tokens and publish times, who stored each image.

``batches.token`` is the fencing token (bumped by every claim; every write after a claim is
conditional on it), ``batches.published_at`` when its last message was sent (NULL: none is known
to be on the broker, so the sweeper publishes it), ``batches.publishes`` how many were sent.
``images.worker`` names the worker whose fenced write stored the row. ``jobs.images_done`` counts the
images recorded, in the transactions that record them (the last one completes the job).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("token", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("publishes", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("published_at", TIMESTAMP, nullable=True))
    op.create_index(op.f("ix_batches_status_published_at"), "batches", ["status", "published_at"])
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("worker", sa.String(256), nullable=True))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("images_done", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("images_done")
    with op.batch_alter_table("images") as batch:
        batch.drop_column("worker")
    op.drop_index(op.f("ix_batches_status_published_at"), table_name="batches")
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("published_at")
        batch.drop_column("publishes")
        batch.drop_column("token")
