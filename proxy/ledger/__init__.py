"""The ledger of record: every wallet's ledger entries archived to a SQL database
(PostgreSQL in production, SQLite by default), the reports and statements read
from it, and the audit of admin actions.

Redis stays the source of truth for balances and holds; this package owns the
copy that history, reports and audits are read from (`schema`, `db`), the
worker that copies and then trims (`archiver`), and what is read from it.
"""
