"""Test mode: test end users' calls go to the built-in sandbox, are charged on their test wallet
with every ledger entry simulated, and no credential of one mode ever acts on the other."""

from __future__ import annotations

import openai
import pytest

from pricing import Usage, price_usage
from proxy.app import create_app
from proxy.appstate import RATECARDS
from proxy.store import TEST_KEY_PREFIX
from tests.conftest import ADMIN, OPERATOR_KEY
from tests.ledger.conftest import archive_now
from tests.proxy.test_gateway_failures import sdk

OPERATOR_TEST_KEY = "test-operator-test-key"
ASK = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 8}


@pytest.fixture
async def gateway(aiohttp_client, gateway_config):
    config = type(gateway_config).model_validate({**gateway_config.model_dump(), "operator_test_keys": [OPERATOR_TEST_KEY]})
    return await aiohttp_client(create_app(config), server_kwargs={"handler_cancellation": True})


async def end_user(gateway, user_id: str, *, livemode: bool, funds: int = 1_000_000) -> str:
    """Create the end user through the admin API, fund them, and return a key of theirs."""
    resp = await gateway.post("/admin/end-users", json={"id": user_id, "livemode": livemode}, headers=ADMIN)
    assert resp.status == 201, await resp.text()
    assert (await resp.json())["livemode"] is livemode
    top_up = await gateway.post(f"/admin/wallets/{user_id}/top-ups", json={"amount_micros": funds},
                                headers={**ADMIN, "Idempotency-Key": f"seed-{user_id}"})
    assert top_up.status == 201
    return (await (await gateway.post(f"/admin/end-users/{user_id}/keys", json={}, headers=ADMIN)).json())["key"]


def price(gateway, usage: Usage, model_name: str = "gpt-4o-mini") -> int:
    model = gateway.server.app[RATECARDS].current.card_for("default").model(model_name)
    return price_usage(model, usage).price_micros


async def test_a_test_keys_calls_never_reach_the_real_upstream_nor_touch_a_live_wallet(gateway, base_url, mock_upstream, wallets):
    await end_user(gateway, "u_live", livemode=True)
    key = await end_user(gateway, "u_test", livemode=False)
    client = sdk(base_url, key)
    whole = await client.chat.completions.create(**ASK)
    streamed = [c async for c in await client.chat.completions.create(**ASK, stream=True, stream_options={"include_usage": True})]
    embedded = await client.embeddings.create(model="text-embedding-3-small", input="hello")
    assert mock_upstream.request_count == 0
    assert whole.choices[0].message.content and streamed[-1].usage == whole.usage and embedded.data
    charges = [e for e in await wallets.ledger("u_test") if e.type == "charge"]
    assert len(charges) == 3 and all(e.details["shortfall_micros"] == 0 for e in charges)
    chat_cost = price(gateway, Usage(prompt_tokens=whole.usage.prompt_tokens, completion_tokens=whole.usage.completion_tokens))
    assert sorted(-e.amount_micros for e in charges if e.details["model"] == "gpt-4o-mini") == [chat_cost, chat_cost]
    live = await wallets.get("u_live")
    assert (live.balance_micros, live.held_micros) == (1_000_000, 0)
    assert [e.type for e in await wallets.ledger("u_live")] == ["top_up", "open"]


async def test_every_ledger_entry_of_a_test_wallet_is_simulated(gateway, base_url, wallets):
    key = await end_user(gateway, "u_test", livemode=False)
    await sdk(base_url, key).chat.completions.create(**ASK)
    entries = await wallets.ledger("u_test")
    assert {e.type for e in entries} >= {"open", "top_up", "charge"}
    assert all(e.details.get("is_simulated") is True for e in entries)
    await end_user(gateway, "u_live", livemode=True)
    assert not any("is_simulated" in e.details for e in await wallets.ledger("u_live"))


async def test_the_sandbox_answers_the_same_request_the_same_way(gateway, base_url):
    client = sdk(base_url, await end_user(gateway, "u_test", livemode=False))
    first, second = await client.chat.completions.create(**ASK), await client.chat.completions.create(**ASK)
    assert first.choices[0].message.content == second.choices[0].message.content
    assert first.usage == second.usage


async def test_test_end_users_get_test_keys_and_live_ones_live_keys(gateway):
    assert (await end_user(gateway, "u_test", livemode=False)).startswith(TEST_KEY_PREFIX)
    assert not (await end_user(gateway, "u_live", livemode=True)).startswith(TEST_KEY_PREFIX)


async def test_a_key_whose_mode_is_not_its_end_users_is_refused(gateway, base_url, wallets, mock_upstream):
    key = await end_user(gateway, "u_1", livemode=True)
    await wallets.update_profile("u_1", {"livemode": False})  # the record says test; the key says live
    with pytest.raises(openai.AuthenticationError):
        await sdk(base_url, key).chat.completions.create(**ASK)
    assert mock_upstream.request_count == 0
    assert [e.type for e in await wallets.ledger("u_1")] == ["top_up", "open"]


@pytest.mark.parametrize("operator_key, user_is_live", [(OPERATOR_TEST_KEY, True), (OPERATOR_KEY, False)],
                         ids=["test_key_on_live_user", "live_key_on_test_user"])
async def test_an_operator_key_of_one_mode_cannot_act_on_an_end_user_of_the_other(
        gateway, base_url, wallets, mock_upstream, operator_key, user_is_live):
    await end_user(gateway, "u_1", livemode=user_is_live)
    with pytest.raises(openai.PermissionDeniedError) as refused:
        await sdk(base_url, operator_key).chat.completions.create(**ASK, user="u_1")
    assert refused.value.code == "livemode_mismatch"
    assert mock_upstream.request_count == 0
    assert (await wallets.get("u_1")).balance_micros == 1_000_000


async def test_an_operator_test_key_acts_on_a_test_end_user_in_the_sandbox(gateway, base_url, wallets, mock_upstream):
    await end_user(gateway, "u_test", livemode=False)
    await sdk(base_url, OPERATOR_TEST_KEY).chat.completions.create(**ASK, user="u_test")
    assert mock_upstream.request_count == 0
    assert (await wallets.get("u_test")).balance_micros < 1_000_000


async def test_a_test_end_users_mode_cannot_be_changed(gateway):
    await end_user(gateway, "u_test", livemode=False)
    resp = await gateway.patch("/admin/end-users/u_test", json={"livemode": True}, headers=ADMIN)
    assert resp.status == 400
    assert (await (await gateway.get("/admin/end-users/u_test", headers=ADMIN)).json())["livemode"] is False


async def test_reports_leave_simulated_entries_out_unless_asked(gateway, base_url):
    await sdk(base_url, await end_user(gateway, "u_test", livemode=False)).chat.completions.create(**ASK)
    await sdk(base_url, await end_user(gateway, "u_live", livemode=True)).chat.completions.create(**ASK)
    await archive_now(gateway)

    async def report(path: str) -> list[dict]:
        resp = await gateway.get(path, headers=ADMIN)
        assert resp.status == 200, await resp.text()
        return (await resp.json())["data"]

    assert [r["end_user"] for r in await report("/admin/reports/usage")] == ["u_live"]
    assert [r["end_user"] for r in await report("/admin/reports/usage?include_simulated=true")] == ["u_live", "u_test"]
    assert [r["amount_micros"] for r in await report("/admin/reports/money")] == [1_000_000]
    assert [r["amount_micros"] for r in await report("/admin/reports/money?include_simulated=true")] == [2_000_000]
    assert (await gateway.get("/admin/reports/usage?include_simulated=yes", headers=ADMIN)).status == 400
