"""Workers: the host of each row's process, so that a row is one process's (name, host, pid).

A worker refuses to start under the name of another live worker; a process of this host that
is gone (its pid no longer exists) gives its name back at once. Heartbeats and the stop mark
only touch the row of the process that registered it.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("host", sa.String(256), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("host")
