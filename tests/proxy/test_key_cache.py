"""The metered path's cached key lookups: one round trip fewer per call, and never a call paid for,
or refused, on a key that changed since it was cached (the hold checks the key's stamp atomically;
any refusal re-checks it). "Another replica" is a second app on the same Redis, with its own cache."""

from __future__ import annotations

import pytest

from proxy.app import create_app
from proxy.appstate import ACCOUNTS
from proxy.store import AccountStore, StaleCredential, WalletStore
from tests.conftest import ADMIN, RecordingCommands, money_ledger
from tests.proxy.test_scopes import CHAT, assert_refused, chat, scoped_key, snapshot

STALE_STAMP = "not-the-stamp"


@pytest.fixture
async def other_replica(aiohttp_client, gateway_config):
    return await aiohttp_client(create_app(gateway_config), server_kwargs={"handler_cancellation": True})


async def patch_key(gateway, key_id: str, **changes) -> None:
    resp = await gateway.patch(f"/admin/end-users/u_1/keys/{key_id}", json=changes, headers=ADMIN)
    assert resp.status == 200, await resp.text()


async def test_a_cached_key_is_not_looked_up_again(gateway, make_end_user):
    await make_end_user()
    key = await scoped_key(gateway)
    assert (await chat(gateway, key["key"])).status == 200
    accounts: AccountStore = gateway.server.app[ACCOUNTS]
    recording = RecordingCommands(accounts.commands)
    accounts.commands = recording
    assert (await chat(gateway, key["key"])).status == 200
    assert recording.sent == []


async def test_an_unknown_key_is_refused_on_one_lookup(gateway, make_end_user):
    await make_end_user()
    accounts: AccountStore = gateway.server.app[ACCOUNTS]
    recording = RecordingCommands(accounts.commands)
    accounts.commands = recording
    await assert_refused(await chat(gateway, "sk-eu_" + "x" * 43), 401, "invalid_api_key")
    assert [c[0] for c in recording.sent] == ["GET"]


async def test_a_key_revoked_elsewhere_pays_for_nothing_on_a_replica_that_cached_it(other_replica, gateway,
                                                                                  make_end_user, wallets,
                                                                                  mock_upstream):
    await make_end_user()
    key = await scoped_key(gateway)
    assert (await chat(other_replica, key["key"])).status == 200  # cached there
    assert (await gateway.delete(f"/admin/end-users/u_1/keys/{key['id']}", headers=ADMIN)).status == 200
    before = await snapshot(wallets)
    await assert_refused(await chat(other_replica, key["key"]), 401, "invalid_api_key")
    assert await snapshot(wallets) == before and mock_upstream.request_count == 1


async def test_a_model_allowed_elsewhere_is_served_at_once_by_a_replica_that_cached_the_key(other_replica, gateway,
                                                                                          make_end_user, wallets):
    await make_end_user()
    key = await scoped_key(gateway, models=["gpt-4o"])
    await assert_refused(await chat(other_replica, key["key"]), 404, "model_not_found")  # cached with that scope
    await patch_key(gateway, key["id"], models=["gpt-4o", "gpt-4o-mini"])
    assert (await chat(other_replica, key["key"])).status == 200
    assert [e.type for e in await money_ledger(wallets, "u_1")].count("charge") == 1


async def test_a_rate_limit_raised_elsewhere_admits_the_next_call_on_a_replica_that_cached_the_key(
        other_replica, gateway, make_end_user):
    await make_end_user()
    key = await scoped_key(gateway, requests_per_minute=1)
    assert (await chat(other_replica, key["key"])).status == 200
    await assert_refused(await chat(other_replica, key["key"]), 429, "rate_limit_exceeded")
    await patch_key(gateway, key["id"], requests_per_minute=100)
    assert (await chat(other_replica, key["key"])).status == 200


async def test_a_spend_cap_lowered_elsewhere_binds_the_next_call_on_a_replica_that_cached_the_key(
        other_replica, gateway, make_end_user, wallets, mock_upstream):
    await make_end_user()
    key = await scoped_key(gateway)
    assert (await chat(other_replica, key["key"])).status == 200
    await patch_key(gateway, key["id"], max_spend_micros=1)  # less than CHAT holds
    before = await snapshot(wallets)
    resp = await chat(other_replica, key["key"])
    assert resp.status == 402, await resp.text()
    assert await snapshot(wallets) == before and mock_upstream.request_count == 1


async def test_a_hold_on_a_stale_stamp_is_refused_and_holds_nothing(wallets: WalletStore, accounts: AccountStore,
                                                                     make_end_user, redis):
    user = await make_end_user()
    found = await accounts.find_key_cached(user.key)
    assert found is not None and found[1] is not None
    stamp = found[1]
    with pytest.raises(StaleCredential):
        await wallets.hold("u_1", 1_000, key_stamp=type(stamp)(stamp.end_user_id, stamp.key_id, STALE_STAMP))
    state = await wallets.get("u_1")
    assert state.held_micros == 0 and await redis.zcard("mg:hold-index") == 0
    hold = await wallets.hold("u_1", 1_000, key_stamp=stamp)
    assert hold.amount_micros == 1_000
    await wallets.release("u_1", hold.hold_id)


async def test_every_change_of_a_key_replaces_its_stamp(accounts: AccountStore, make_end_user):
    user = await make_end_user()
    first = await accounts.find_key_cached(user.key)
    assert first is not None and first[1] is not None
    [key] = await accounts.list_keys("u_1")  # the stamp fields are not keys
    await accounts.update_key("u_1", key.id, name="renamed")
    assert not await accounts.stamp_is_current(first[1])
    accounts.forget_cached_key(user.key)
    again = await accounts.find_key_cached(user.key)
    assert again is not None and again[0].name == "renamed" and again[1] is not None
    assert await accounts.stamp_is_current(again[1])


async def test_the_first_call_after_a_change_elsewhere_is_charged_once(other_replica, gateway, make_end_user, wallets):
    await make_end_user()
    key = await scoped_key(gateway)
    assert (await chat(other_replica, key["key"])).status == 200
    await patch_key(gateway, key["id"], name="renamed")  # a change that refuses nothing
    resp = await other_replica.post("/v1/chat/completions", json={**CHAT, "stream": True},
                                    headers={"Authorization": f"Bearer {key['key']}"})
    assert resp.status == 200 and b"[DONE]" in await resp.read()
    state = await wallets.get("u_1")
    assert state.held_micros == 0
    assert [e.type for e in await money_ledger(wallets, "u_1")].count("charge") == 2
