"""An end user's budget as the wallet scripts keep it: the claim a call is held
under (`CallBudget`) and what the current period has used (`BudgetStore.usage`).

The terms (limit, calendar period, time zone) and the period's name live in
`proxy/budgets.py`; the counting is in the wallet scripts ("Budgets" in
`proxy/lua/_prelude.lua`), in the same step as the hold, its growth and its close.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.store.keyspace import _wallet_key
from proxy.store.scripts import Commands


@dataclass(frozen=True, slots=True)
class CallBudget:
    """The budget a call is admitted under: its limit and the period it counts in ('2026-12')."""

    limit_micros: int
    period: str


@dataclass(frozen=True)
class BudgetUsage:
    """What a period has used of a budget: captured, and reserved by calls in flight."""

    period: str
    spent_micros: int
    held_micros: int


class BudgetStore:
    def __init__(self, commands: Commands):
        self.commands = commands

    async def usage(self, wallet_id: str, period: str) -> BudgetUsage:
        """Usage of `period`; a period the wallet has not reached yet has used nothing."""
        current, spent, held = await self.commands.execute("HMGET", _wallet_key(wallet_id), "bud_period", "bud_spent", "bud_held")
        if current is None or (current.decode() if isinstance(current, bytes) else current) != period:
            return BudgetUsage(period, 0, 0)
        return BudgetUsage(period, int(spent or 0), int(held or 0))
