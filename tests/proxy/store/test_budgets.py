"""Budgets in the wallet scripts: a period's spent + held never passes its limit,
whatever the holds do, and a new period name starts the count again."""

from __future__ import annotations

import asyncio

import pytest

from proxy.store import BudgetExceeded, WalletStore
from proxy.store.budgets import BudgetStore, BudgetUsage, CallBudget

DEC = CallBudget(limit_micros=1_000, period="2026-12")


async def usage(wallets: WalletStore, period: str = "2026-12") -> BudgetUsage:
    return await BudgetStore(wallets.commands).usage("u_1", period)


@pytest.fixture
async def funded(wallets: WalletStore) -> WalletStore:
    await wallets.open("u_1", profile={})
    await wallets.top_up("u_1", 1_000_000, idempotency_key="seed")
    return wallets


async def test_a_hold_over_what_the_budget_leaves_is_refused_and_changes_nothing(funded):
    await funded.hold("u_1", 700, budget=DEC)
    before = await funded.get("u_1")
    with pytest.raises(BudgetExceeded):
        await funded.hold("u_1", 301, budget=DEC)
    assert await funded.get("u_1") == before
    assert await usage(funded) == BudgetUsage("2026-12", 0, 700)


async def test_a_settle_replaces_the_reservation_by_the_capture(funded):
    hold = await funded.hold("u_1", 700, budget=DEC)
    await funded.settle("u_1", hold.hold_id, 250)
    assert await usage(funded) == BudgetUsage("2026-12", 250, 0)


async def test_a_release_gives_the_reservation_back(funded):
    hold = await funded.hold("u_1", 700, budget=DEC)
    await funded.release("u_1", hold.hold_id)
    assert await usage(funded) == BudgetUsage("2026-12", 0, 0)
    await funded.hold("u_1", 1_000, budget=DEC)


async def test_a_capture_past_the_budget_is_cut_to_it_and_the_rest_is_shortfall(funded):
    hold = await funded.hold("u_1", 600, budget=DEC)
    settled = await funded.settle("u_1", hold.hold_id, 1_500)  # the upstream reported more than was held
    assert (settled.captured_micros, settled.shortfall_micros) == (1_000, 500)
    assert await usage(funded) == BudgetUsage("2026-12", 1_000, 0)


async def test_a_hold_grows_only_as_far_as_the_budget_leaves(funded):
    hold = await funded.hold("u_1", 600, budget=DEC)
    await funded.hold("u_1", 300, budget=DEC)
    with pytest.raises(BudgetExceeded):
        await funded.extend("u_1", hold.hold_id, 101, current_micros=600, budget_period="2026-12")
    grown = await funded.extend("u_1", hold.hold_id, 100, current_micros=600, budget_period="2026-12")
    assert grown.amount_micros == 700
    assert await usage(funded) == BudgetUsage("2026-12", 0, 1_000)


async def test_concurrent_holds_never_reserve_past_the_budget(funded):
    async def call() -> bool:
        try:
            hold = await funded.hold("u_1", 30, budget=DEC)
        except BudgetExceeded:
            return False
        await funded.settle("u_1", hold.hold_id, 30)
        return True

    admitted = sum(await asyncio.gather(*(call() for _ in range(100))))
    assert admitted == 33  # 33 * 30 = 990; a 34th would need 1,020
    assert await usage(funded) == BudgetUsage("2026-12", 990, 0)


async def test_a_new_period_starts_at_zero_and_a_hold_from_the_last_one_counts_its_capture_there(funded):
    old = await funded.hold("u_1", 900, budget=CallBudget(1_000, "2026-11"))
    fresh = await funded.hold("u_1", 800, budget=DEC)  # November's 900 held does not count in December
    assert await usage(funded) == BudgetUsage("2026-12", 0, 800)
    await funded.settle("u_1", old.hold_id, 150)  # November's call ends in December: it is spent now
    assert await usage(funded) == BudgetUsage("2026-12", 150, 800)
    settled = await funded.settle("u_1", fresh.hold_id, 900)  # only 850 fit
    assert (settled.captured_micros, settled.shortfall_micros) == (850, 50)
    assert await usage(funded) == BudgetUsage("2026-12", 1_000, 0)
    assert await usage(funded, "2026-11") == BudgetUsage("2026-11", 0, 0)  # gone: the wallet has moved on


async def test_an_expired_hold_gives_its_reservation_back(funded):
    hold = await funded.hold("u_1", 700, budget=DEC, ttl_ms=50)
    await asyncio.sleep(0.1)
    assert await funded.expire("u_1", hold.hold_id) is not None
    assert await usage(funded) == BudgetUsage("2026-12", 0, 0)
