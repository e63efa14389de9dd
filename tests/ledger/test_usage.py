"""GET /v1/usage: an end user's own calls and money movements from the ledger of record, paged, newest first."""

from __future__ import annotations

from proxy.appstate import WALLETS
from proxy.ledger.reporting import MONEY_TYPES
from tests.conftest import OPERATOR_KEY
from tests.ledger.test_reports import admin, mixed_load


async def pages(gateway, headers: dict[str, str], limit: int, extra: str = "") -> list[dict]:
    seen: list[dict] = []
    cursor = None
    for _ in range(100):
        query = f"?limit={limit}{extra}" + (f"&starting_after={cursor}" if cursor else "")
        response = await gateway.get("/v1/usage" + query, headers=headers)
        assert response.status == 200, await response.text()
        page = await response.json()
        seen += page["data"]
        cursor = page["next_cursor"]
        if cursor is None:
            return seen
    raise AssertionError("paging did not end")


async def expected_ids(gateway, user: str) -> list[str]:
    entries = await gateway.server.app[WALLETS].ledger(user, limit=10_000)  # newest first
    return [e.id for e in entries if e.type == "charge" or e.type in MONEY_TYPES]


async def test_paging_walks_the_end_users_own_entries_once_newest_first(ledger_gateway, mock_upstream):
    await mixed_load(ledger_gateway, mock_upstream)
    key = (await admin(ledger_gateway, "POST", "/end-users/u_1/keys", {}))["key"]

    seen = await pages(ledger_gateway, {"Authorization": f"Bearer {key}"}, limit=3)

    assert [e["id"] for e in seen] == await expected_ids(ledger_gateway, "u_1")
    charges = [e for e in seen if e["type"] == "charge"]
    assert charges and all(e["model"] and e["amount_micros"] < 0 and e["request_id"] for e in charges)
    assert {e["type"] for e in seen} == {"charge", "top_up", "refund"}


async def test_an_end_user_never_sees_another_ones_entries(ledger_gateway, mock_upstream):
    await mixed_load(ledger_gateway, mock_upstream)
    key = (await admin(ledger_gateway, "POST", "/end-users/u_2/keys", {}))["key"]

    seen = await pages(ledger_gateway, {"Authorization": f"Bearer {key}"}, limit=500)

    assert [e["id"] for e in seen] == await expected_ids(ledger_gateway, "u_2")
    assert "refund" not in {e["type"] for e in seen}  # u_1's refund


async def test_an_operator_key_reads_the_end_user_it_names(ledger_gateway, mock_upstream):
    await mixed_load(ledger_gateway, mock_upstream)
    seen = await pages(ledger_gateway, {"Authorization": f"Bearer {OPERATOR_KEY}"}, limit=4, extra="&user=u_2")
    assert [e["id"] for e in seen] == await expected_ids(ledger_gateway, "u_2")


async def test_a_date_range_outside_the_activity_is_empty(ledger_gateway, mock_upstream):
    await mixed_load(ledger_gateway, mock_upstream)
    key = (await admin(ledger_gateway, "POST", "/end-users/u_1/keys", {}))["key"]
    assert await pages(ledger_gateway, {"Authorization": f"Bearer {key}"}, 50, "&from=2020-01-01&to=2020-02-01") == []


async def test_bad_usage_requests_are_refused_in_openai_shape(ledger_gateway):
    await admin(ledger_gateway, "POST", "/end-users", {"id": "u_1"})
    key = (await admin(ledger_gateway, "POST", "/end-users/u_1/keys", {}))["key"]
    auth = {"Authorization": f"Bearer {key}"}
    assert (await ledger_gateway.get("/v1/usage")).status == 401
    for query, param in (("limit=0", "limit"), ("limit=x", "limit"), ("starting_after=zzz", "starting_after"),
                         ("from=yesterday", "from")):
        response = await ledger_gateway.get(f"/v1/usage?{query}", headers=auth)
        assert response.status == 400 and (await response.json())["error"]["param"] == param, query
