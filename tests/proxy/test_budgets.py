"""End users' budgets through the proxy: concurrent streams are cut at the budget and never
pass it, the count resets at the period boundary, and the admin API and /v1/wallet show it."""

from __future__ import annotations

import asyncio
import datetime as dt
from decimal import Decimal

import openai
import pytest

from pricing import estimate_prompt_tokens
from proxy.appstate import METERING
from proxy.budgets import BudgetTerms
from proxy.store.budgets import BudgetStore
from tests.conftest import ADMIN
from tests.proxy.calls.test_clamping import affordable, gpt4o
from tests.proxy.test_gateway_failures import sdk
from tests.proxy.test_scopes import bearer

STREAM = {
    "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 1, "stream": True,
}
MONTHLY = {"limit_micros": 1_000, "period": "month"}


def at(text: str) -> float:
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp()


def set_clock(gateway, moment: str) -> None:
    gateway.server.app[METERING].budgets.clock = lambda: at(moment)


async def test_concurrent_streams_are_cut_at_the_monthly_budget_and_never_pass_it(gateway, make_end_user, mock_upstream, wallets):
    # Each call holds a few micros for its one token; the upstream ignores
    # max_tokens and sends 40 words, so every stream asks to grow its hold.
    user = await make_end_user(budget=MONTHLY)
    mock_upstream.reply_words = 40

    async def call() -> tuple[int, bytes]:
        resp = await gateway.post("/v1/chat/completions", json=STREAM, headers=bearer(user.key))
        return resp.status, await resp.read()

    results = await asyncio.gather(*(call() for _ in range(300)))
    statuses = [status for status, _ in results]
    assert statuses.count(200) > 0 and set(statuses) <= {200, 402}
    assert any(b"budget_exceeded" in body for status, body in results if status == 200), "no stream was cut in-band"
    assert any(b"budget_exceeded" in body for status, body in results if status == 402)
    charges = [e for e in await wallets.ledger(user.id, limit=2_000) if e.type == "charge"]
    captured = -sum(e.amount_micros for e in charges)
    period = gateway.server.app[METERING].budgets.period_now(BudgetTerms(**MONTHLY)).name
    used = await BudgetStore(wallets.commands).usage(user.id, period)
    assert (used.spent_micros, used.held_micros) == (captured, 0)
    assert 0 < captured <= 1_000
    state = await wallets.get(user.id)
    assert (state.balance_micros, state.held_micros) == (10_000_000 - captured, 0)


async def test_the_budget_resets_at_the_period_boundary(gateway, base_url, make_end_user, wallets):
    user = await make_end_user(budget={"limit_micros": 60, "period": "month"})
    client = sdk(base_url, user.key)
    ask = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16}
    set_clock(gateway, "2026-11-30T23:59:59")
    while True:
        try:
            await client.chat.completions.create(**ask)
        except openai.APIStatusError as refused:
            assert refused.status_code == 402 and refused.code == "budget_exceeded"
            break
    november = await BudgetStore(wallets.commands).usage(user.id, "2026-11")
    assert 0 < november.spent_micros <= 60
    set_clock(gateway, "2026-12-01T00:00:00")
    raw = await client.chat.completions.with_raw_response.create(**ask)
    cost = int(Decimal(raw.headers["X-Usage-Cost"]) * 1_000_000)
    wallet = (await gateway.get("/v1/wallet", headers=bearer(user.key)))
    budget = (await wallet.json())["budget"]
    assert (budget["current_period"], budget["spent_micros"], budget["held_micros"], budget["remaining_micros"]) == (
        "2026-12", cost, 0, 60 - cost)
    assert budget["resets_at"] == int(at("2027-01-01T00:00:00"))


async def test_a_daily_budget_in_a_time_zone_resets_at_its_local_midnight(gateway, base_url, make_end_user):
    user = await make_end_user(budget={"limit_micros": 5_000, "period": "day", "timezone": "America/New_York"})
    set_clock(gateway, "2026-12-03T04:59:59")  # 23:59:59 in New York
    body = (await (await gateway.get("/v1/wallet", headers=bearer(user.key))).json())["budget"]
    assert (body["current_period"], body["resets_at"]) == ("2026-12-02", int(at("2026-12-03T05:00:00")))


async def test_a_tiers_default_budget_applies_to_end_users_without_their_own(gateway, base_url, make_end_user):
    gateway.server.app[METERING].budgets.tier_defaults["default"] = BudgetTerms(limit_micros=0, period="month")
    user = await make_end_user()
    with pytest.raises(openai.APIStatusError) as refused:
        await sdk(base_url, user.key).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert (refused.value.status_code, refused.value.code) == (402, "budget_exceeded")
    own = await make_end_user("u_2", budget={"limit_micros": 1_000_000})
    await sdk(base_url, own.key).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)


async def test_a_call_whose_worst_case_passes_the_budget_is_clamped_to_what_it_leaves(gateway, base_url, make_end_user, mock_upstream):
    budget = 10_000
    user = await make_end_user(budget={"limit_micros": budget})
    ask = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Name three rivers"}]}
    raw = await sdk(base_url, user.key).chat.completions.with_raw_response.create(**ask)
    assert raw.headers["X-Max-Tokens-Clamped"] == str(affordable(gpt4o(gateway), estimate_prompt_tokens(ask), budget))


async def test_the_admin_api_sets_shows_and_removes_an_end_users_budget(gateway, make_end_user):
    await make_end_user()
    resp = await gateway.patch("/admin/end-users/u_1", json={"budget": {"limit_micros": 500_000_000}}, headers=ADMIN)
    assert resp.status == 200, await resp.text()
    budget = (await resp.json())["budget"]
    assert (budget["limit_micros"], budget["period"], budget["timezone"], budget["source"], budget["spent_micros"]) == (
        500_000_000, "month", "UTC", "end_user", 0)
    resp = await gateway.patch("/admin/end-users/u_1", json={"budget": None}, headers=ADMIN)
    assert (await resp.json())["budget"] is None


@pytest.mark.parametrize("budget", [
    {"limit_micros": -1}, {"limit_micros": 10, "period": "week"}, {"limit_micros": 10, "timezone": "Mars/Olympus"},
    {"limit_micros": "10"}, {"period": "month"},
])
async def test_a_bad_budget_is_a_400_and_changes_nothing(gateway, make_end_user, budget):
    await make_end_user()
    resp = await gateway.patch("/admin/end-users/u_1", json={"budget": budget}, headers=ADMIN)
    assert resp.status == 400 and (await resp.json())["error"]["param"].startswith("budget")
    assert (await (await gateway.get("/admin/end-users/u_1", headers=ADMIN)).json())["budget"] is None


