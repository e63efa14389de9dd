"""Each archived entry's asset (the wallet's: USD unless the config defines another)
and whether it is a sandbox wallet's (is_simulated), so reports can group by the
first and leave the second out.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("ledger_entries") as batch:
        batch.add_column(sa.Column("asset", sa.String(32), nullable=False, server_default="USD"))
        batch.add_column(sa.Column("is_simulated", sa.Boolean, nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("ledger_entries") as batch:
        batch.drop_column("is_simulated")
        batch.drop_column("asset")
