"""Alembic's environment for the ledger of record: always run by `proxy.ledger.db.migrate`,
which passes an open connection (sync facade of the async engine) in `config.attributes`."""

from __future__ import annotations

from alembic import context

from proxy.ledger.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("the ledger's migrations run through proxy.ledger.db.migrate (metergate does it at start)")
context.configure(connection=connection, target_metadata=metadata, render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
