"""The archived ledger entries and the append-only audit log.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "ledger_entries",
        sa.Column("wallet_id", sa.String(128), primary_key=True),
        sa.Column("entry_id", sa.String(40), primary_key=True),
        sa.Column("at_ms", sa.BigInteger, nullable=False),
        sa.Column("day", sa.String(10), nullable=False),
        sa.Column("month", sa.String(7), nullable=False),
        sa.Column("type", sa.String(40), nullable=False),
        sa.Column("amount_micros", sa.BigInteger, nullable=False),
        sa.Column("balance_micros", sa.BigInteger, nullable=False),
        sa.Column("held_micros", sa.BigInteger, nullable=False),
        sa.Column("model", sa.String(200)),
        sa.Column("key_id", sa.String(64)),
        sa.Column("tier", sa.String(64)),
        sa.Column("request_id", sa.String(80)),
        sa.Column("prompt_tokens", sa.BigInteger),
        sa.Column("completion_tokens", sa.BigInteger),
        sa.Column("price_micros", sa.BigInteger),
        sa.Column("cost_micros", sa.BigInteger),
        sa.Column("outcome", sa.String(40)),
        sa.Column("details", sa.Text, nullable=False),
    )
    op.create_index("ix_ledger_entries_at", "ledger_entries", ["at_ms"])
    op.create_index("ix_ledger_entries_wallet_at", "ledger_entries", ["wallet_id", "at_ms"])
    op.create_index("ix_ledger_entries_type_at", "ledger_entries", ["type", "at_ms"])
    op.create_table(
        "audit_log",
        sa.Column("id", _BigId, primary_key=True, autoincrement=True),
        sa.Column("at_ms", sa.BigInteger, nullable=False),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("method", sa.String(8), nullable=False),
        sa.Column("path", sa.String(500), nullable=False),
        sa.Column("action", sa.String(120), nullable=False),
        sa.Column("target", sa.String(200)),
        sa.Column("request_id", sa.String(80), nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("request_body", sa.Text),
        sa.Column("before", sa.Text),
        sa.Column("after", sa.Text),
    )
    op.create_index("ix_audit_log_at", "audit_log", ["at_ms"])
    op.create_index("ix_audit_log_target", "audit_log", ["target"])
    # The audit log is append-only, whoever connects: the database itself refuses changes to it.
    if op.get_bind().dialect.name == "postgresql":
        op.execute("""
            CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION 'audit_log is append-only'; END $$""")
        op.execute("""
            CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
            FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()""")
    else:
        for event in ("UPDATE", "DELETE"):
            op.execute(f"""
                CREATE TRIGGER audit_log_no_{event.lower()} BEFORE {event} ON audit_log
                BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END""")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_log_append_only ON audit_log")
        op.execute("DROP FUNCTION IF EXISTS audit_log_append_only()")
    op.drop_table("audit_log")
    op.drop_table("ledger_entries")
