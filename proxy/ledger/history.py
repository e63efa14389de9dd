"""Single-entry lookups in the ledger of record, for paths that need an entry Redis no longer holds."""

from __future__ import annotations

import sqlalchemy as sa

from proxy.ledger.db import LedgerDatabase
from proxy.ledger.schema import ledger_entries


async def archived_charge_micros(db: LedgerDatabase, wallet_id: str, charge_id: str) -> int | None:
    """What the archived charge `charge_id` of the wallet captured, or None if there is no such charge."""
    query = sa.select(ledger_entries.c.amount_micros).where(
        ledger_entries.c.wallet_id == wallet_id, ledger_entries.c.entry_id == charge_id, ledger_entries.c.type == "charge")
    async with db.engine.connect() as conn:
        amount = (await conn.execute(query)).scalar_one_or_none()
    return None if amount is None else -amount
