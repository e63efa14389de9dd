"""Single-entry lookups in the ledger of record, for paths that need an entry Redis no longer holds."""

from __future__ import annotations

from dataclasses import dataclass

import orjson
import sqlalchemy as sa

from proxy.ledger.db import LedgerDatabase
from proxy.ledger.schema import ledger_entries


@dataclass(frozen=True)
class ArchivedCharge:
    captured_micros: int
    grants: str  # the grants it drew from ("gr_3:300,purchased:200"; "" for a charge made before grants)


async def archived_charge(db: LedgerDatabase, wallet_id: str, charge_id: str) -> ArchivedCharge | None:
    """What the archived charge `charge_id` of the wallet captured and drew, or None if there is no such charge."""
    query = sa.select(ledger_entries.c.amount_micros, ledger_entries.c.details).where(
        ledger_entries.c.wallet_id == wallet_id, ledger_entries.c.entry_id == charge_id, ledger_entries.c.type == "charge")
    async with db.engine.connect() as conn:
        row = (await conn.execute(query)).one_or_none()
    if row is None:
        return None
    grants = orjson.loads(row.details).get("grants")
    return ArchivedCharge(captured_micros=-row.amount_micros, grants=grants if isinstance(grants, str) else "")
