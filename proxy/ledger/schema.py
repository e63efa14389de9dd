"""The SQL tables of the ledger of record (SQLAlchemy Core). Alembic migrations
in `migrations/versions` create them; this module is what queries are written
against, so the two must agree (tests/ledger/test_db.py checks they do)."""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Column, Index, Integer, MetaData, String, Table, Text, false

metadata = MetaData()

# SQLite only auto-increments an INTEGER PRIMARY KEY.
_BigId = BigInteger().with_variant(Integer(), "sqlite")

# One row per Redis ledger entry, keyed by the entry's own id in its wallet's
# stream: inserting an entry twice is a no-op, so archiving is exactly once.
ledger_entries = Table(
    "ledger_entries", metadata,
    Column("wallet_id", String(128), primary_key=True),
    Column("entry_id", String(40), primary_key=True),  # the stream id, "<unix ms>-<seq>"
    Column("at_ms", BigInteger, nullable=False),  # the entry's time (from its id)
    Column("day", String(10), nullable=False),  # UTC "YYYY-MM-DD": portable grouping by day
    Column("month", String(7), nullable=False),  # UTC "YYYY-MM"
    Column("type", String(40), nullable=False),  # open, top_up, hold, charge, release, refund, adjustment, ...
    Column("amount_micros", BigInteger, nullable=False),  # what moved the balance (0 for holds and notes)
    Column("balance_micros", BigInteger, nullable=False),  # after the entry
    Column("held_micros", BigInteger, nullable=False),  # after the entry
    # From a charge's metadata (null for other entries): what reports group and sum.
    Column("model", String(200)),
    Column("key_id", String(64)),
    Column("tier", String(64)),
    Column("request_id", String(80)),
    Column("prompt_tokens", BigInteger),
    Column("completion_tokens", BigInteger),
    Column("price_micros", BigInteger),  # the price of the usage (what was captured, plus any shortfall)
    Column("cost_micros", BigInteger),  # the provider's cost of the usage (margin = captured - cost)
    Column("outcome", String(40)),
    Column("details", Text, nullable=False),  # every field of the entry, as JSON
    Column("asset", String(32), nullable=False, server_default="USD"),  # the wallet's asset (its amounts' unit)
    Column("is_simulated", Boolean, nullable=False, server_default=false()),  # a sandbox wallet's entry
)
Index("ix_ledger_entries_at", ledger_entries.c.at_ms)
Index("ix_ledger_entries_wallet_at", ledger_entries.c.wallet_id, ledger_entries.c.at_ms)
Index("ix_ledger_entries_type_at", ledger_entries.c.type, ledger_entries.c.at_ms)

# Every admin request that changed something. Append-only: the migration puts
# triggers on it that refuse UPDATE and DELETE.
audit_log = Table(
    "audit_log", metadata,
    Column("id", _BigId, primary_key=True, autoincrement=True),
    Column("at_ms", BigInteger, nullable=False),
    Column("actor", String(64), nullable=False),  # the admin key's name (never the key)
    Column("role", String(16), nullable=False),
    Column("method", String(8), nullable=False),
    Column("path", String(500), nullable=False),
    Column("action", String(120), nullable=False),  # the route: "POST /end-users/{id}/top-ups"
    Column("target", String(200)),  # the end user, key or endpoint acted on
    Column("request_id", String(80), nullable=False),
    Column("status", Integer, nullable=False),
    Column("request_body", Text),  # JSON, secrets left out
    Column("before", Text),  # JSON: the target before the change
    Column("after", Text),  # JSON: the target after it
)
Index("ix_audit_log_at", audit_log.c.at_ms)
Index("ix_audit_log_target", audit_log.c.target)
