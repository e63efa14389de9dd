"""Reports from the ledger of record after a mixed load through the real gateway: every total equals
what the wallets' Redis ledgers sum to, to the micro, in JSON and in CSV; on SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import io
from collections import Counter, defaultdict
from typing import Any

import openai
import pytest

from proxy.appstate import WALLETS
from proxy.store import LedgerEntry, WalletStore
from tests.conftest import ADMIN
from tests.ledger.conftest import archive_now
from tests.mock_upstream import MockUpstream

USD = 1_000_000
MONEY = ("top_up", "refund", "adjustment")


def sdk(gateway, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=str(gateway.make_url("/v1")), api_key=key, max_retries=0)


async def admin(gateway, method: str, path: str, json: Any = None, key: str | None = None) -> Any:
    headers = {**ADMIN, **({"Idempotency-Key": key} if key else {})}
    response = await gateway.request(method, "/admin" + path, json=json, headers=headers)
    assert response.status < 300, await response.text()
    return await response.json()


async def mixed_load(gateway, mock_upstream: MockUpstream) -> list[str]:
    """Two end users (two tiers), three keys, whole and streamed calls, a cut stream, top-ups, a refund and
    adjustments. Returns the end users."""
    users = {"u_1": "default", "u_2": "pro"}
    keys: dict[str, list[str]] = defaultdict(list)
    for user, tier in users.items():
        await admin(gateway, "POST", "/end-users", {"id": user, "tier": tier})
        await admin(gateway, "POST", f"/wallets/{user}/top-ups", {"amount_micros": 5 * USD}, key=f"{user}-t1")
        keys[user].append((await admin(gateway, "POST", f"/end-users/{user}/keys", {}))["key"])
    keys["u_1"].append((await admin(gateway, "POST", "/end-users/u_1/keys", {"name": "second"}))["key"])
    messages = [{"role": "user", "content": "Tell me about ledgers"}]
    for user_keys in keys.values():
        for n, key in enumerate(user_keys):
            client = sdk(gateway, key)
            await client.chat.completions.create(model="gpt-4o-mini", messages=messages, max_tokens=20)
            await client.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=10 + n)
            stream = await client.chat.completions.create(model="gpt-4o-mini", messages=messages, max_tokens=30,
                                                          stream=True)
            async for _ in stream:
                pass
    mock_upstream.cut_after_chunks = 2
    with pytest.raises(openai.APIError):
        stream = await sdk(gateway, keys["u_2"][0]).chat.completions.create(
            model="gpt-4o", messages=messages, max_tokens=40, stream=True)
        async for _ in stream:
            pass
    mock_upstream.cut_after_chunks = None
    await admin(gateway, "POST", "/wallets/u_1/top-ups", {"amount_micros": 2 * USD, "reference": "inv_2"}, key="u_1-t2")
    charge = next(e for e in await gateway.server.app[WALLETS].ledger("u_1") if e.type == "charge")
    await admin(gateway, "POST", "/wallets/u_1/refunds",
                {"amount_micros": -charge.amount_micros // 2, "charge_id": charge.id, "reason": "bad answer"}, key="r1")
    await admin(gateway, "POST", "/wallets/u_2/adjustments", {"amount_micros": -1_234, "reason": "correction"}, key="a1")
    await admin(gateway, "POST", "/wallets/u_2/adjustments", {"amount_micros": 555, "reason": "goodwill"}, key="a2")
    await archive_now(gateway)
    return list(users)


async def entries(wallets: WalletStore, user: str) -> list[LedgerEntry]:
    return await wallets.ledger_after(user, "0", limit=100_000)


async def expected_usage(wallets: WalletStore, users: list[str]) -> dict[tuple[str, str, str], Counter[str]]:
    """From Redis: per (end user, model, key), the charges' calls, tokens, spend and cost."""
    out: dict[tuple[str, str, str], Counter[str]] = defaultdict(Counter)
    for user in users:
        for e in await entries(wallets, user):
            if e.type == "charge":
                d = e.details
                out[(user, d["model"], d["key_id"])].update(
                    calls=1, spend_micros=-e.amount_micros, cost_micros=d["cost_micros"], price_micros=d["price_micros"],
                    prompt_tokens=d["prompt_tokens"], completion_tokens=d["completion_tokens"])
    return out


async def test_usage_totals_equal_the_ledgers_to_the_micro_per_group(ledger_gateway, mock_upstream):
    users = await mixed_load(ledger_gateway, mock_upstream)
    wallets = ledger_gateway.server.app[WALLETS]
    expected = await expected_usage(wallets, users)
    assert any(k[0] == "u_2" and k[1] == "gpt-4o" for k in expected) and len(expected) >= 6

    report = await admin(ledger_gateway, "GET", "/reports/usage?group_by=end_user,model,key")

    got = {(r["end_user"], r["model"], r["key"]): r for r in report["data"]}
    assert set(got) == set(expected)
    for group, figures in expected.items():
        row = got[group]
        assert {f: row[f] for f in figures} == dict(figures), group
        assert row["margin_micros"] == row["spend_micros"] - row["cost_micros"]
    assert report["totals"]["spend_micros"] == sum(f["spend_micros"] for f in expected.values())
    assert report["totals"]["calls"] == sum(f["calls"] for f in expected.values()) == 10


async def test_usage_by_tier_and_day_sums_to_the_same_spend(ledger_gateway, mock_upstream):
    users = await mixed_load(ledger_gateway, mock_upstream)
    charges = [e for u in users for e in await entries(ledger_gateway.server.app[WALLETS], u) if e.type == "charge"]

    report = await admin(ledger_gateway, "GET", "/reports/usage?group_by=tier,day")

    by_tier = {r["tier"]: r["spend_micros"] for r in report["data"]}
    assert by_tier == {"default": sum(-e.amount_micros for e in charges if e.details["tier"] == "default"),
                       "pro": sum(-e.amount_micros for e in charges if e.details["tier"] == "pro")}


async def test_the_money_report_equals_the_movements_in_the_ledgers(ledger_gateway, mock_upstream):
    users = await mixed_load(ledger_gateway, mock_upstream)
    expected: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    for user in users:
        for e in await entries(ledger_gateway.server.app[WALLETS], user):
            if e.type in MONEY:
                expected[e.type] += e.amount_micros
                counts[e.type] += 1

    report = await admin(ledger_gateway, "GET", "/reports/money?period=day")

    assert {r["type"]: r["amount_micros"] for r in report["data"]} == dict(expected)
    assert {r["type"]: r["count"] for r in report["data"]} == dict(counts) == {"top_up": 3, "refund": 1, "adjustment": 2}


async def test_the_usage_csv_parses_and_sums_to_the_same_figures(ledger_gateway, mock_upstream):
    users = await mixed_load(ledger_gateway, mock_upstream)
    expected = await expected_usage(ledger_gateway.server.app[WALLETS], users)

    response = await ledger_gateway.get("/admin/reports/usage?group_by=end_user,model,key&format=csv", headers=ADMIN)

    assert response.status == 200 and response.content_type == "text/csv"
    rows = list(csv.DictReader(io.StringIO(await response.text())))
    assert {(r["end_user"], r["model"], r["key"]): int(r["spend_micros"]) for r in rows} == {
        k: f["spend_micros"] for k, f in expected.items()}
    assert sum(int(r["cost_micros"]) for r in rows) == sum(f["cost_micros"] for f in expected.values())
    assert sum(int(r["calls"]) for r in rows) == 10


@pytest.mark.parametrize("query, param", [
    ("format=xml", "format"), ("group_by=colour", "group_by"), ("group_by=model,model", "group_by"),
    ("from=2026-13-01", "from"), ("from=2026-11-10&to=2026-11-10", "to"),
])
async def test_bad_report_parameters_are_a_400_in_openai_shape(ledger_gateway, query, param):
    response = await ledger_gateway.get(f"/admin/reports/usage?{query}", headers=ADMIN)
    assert response.status == 400
    error = (await response.json())["error"]
    assert (error["code"], error["param"]) == ("invalid_parameter", param)


async def test_a_range_without_activity_reports_nothing(ledger_gateway, mock_upstream):
    await mixed_load(ledger_gateway, mock_upstream)
    report = await admin(ledger_gateway, "GET", "/reports/usage?from=2020-01-01&to=2020-02-01")
    assert report["data"] == [] and report["totals"]["spend_micros"] == 0


async def test_monthly_rollups_carry_the_balance_exactly(ledger_gateway, mock_upstream):
    users = await mixed_load(ledger_gateway, mock_upstream)
    for user in users:
        wallet = await ledger_gateway.server.app[WALLETS].get(user)
        ledger = await entries(ledger_gateway.server.app[WALLETS], user)

        rollup = await admin(ledger_gateway, "GET", f"/end-users/{user}/rollups")

        [month] = rollup["data"]  # everything happened this month
        assert month["carried_in_micros"] == 0 and month["carried_out_micros"] == wallet.balance_micros
        assert month["spend_micros"] == sum(-e.amount_micros for e in ledger if e.type == "charge")
        assert month["top_ups_micros"] == sum(e.amount_micros for e in ledger if e.type == "top_up")
        assert (month["top_ups_micros"] - month["spend_micros"] + month["refunds_micros"] + month["other_micros"]
                == wallet.balance_micros)


async def test_rollups_csv_and_bad_months(ledger_gateway, mock_upstream):
    await mixed_load(ledger_gateway, mock_upstream)
    response = await ledger_gateway.get("/admin/end-users/u_2/rollups?format=csv", headers=ADMIN)
    [row] = list(csv.DictReader(io.StringIO(await response.text())))
    assert int(row["carried_out_micros"]) == (await ledger_gateway.server.app[WALLETS].get("u_2")).balance_micros
    for query in ("from_month=2026-13", "to_month=nope", "from_month=2026-10&to_month=2026-09"):
        bad = await ledger_gateway.get(f"/admin/end-users/u_2/rollups?{query}", headers=ADMIN)
        assert bad.status == 400, query
