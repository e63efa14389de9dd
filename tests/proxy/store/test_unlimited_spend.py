"""A credential with no limits at all: its settles count its spend (a cap set later counts it),
in fewer steps than a limited one's, and to the same micros; its holds keep no caps."""

from __future__ import annotations

import time

from proxy.limits import credential_spend
from proxy.store import CredentialSpend, LimitStore
from proxy.store.keyspace import _hold_key, _limits_key
from tests.proxy.test_wallet_store import funded

UNLIMITED = CredentialSpend("key_a", "req_1", tokens=30, limited=False)
LIMITED = CredentialSpend("key_a", "req_1", tokens=30)


async def test_a_settle_counts_an_unlimited_credentials_spend_in_total_and_today(wallets, redis):
    await funded(wallets)
    for n, captured in enumerate((700, 450)):
        spend = CredentialSpend("key_a", f"req_{n}", tokens=30, limited=False)
        hold = await wallets.hold("u_1", 1_000, spend=spend)
        await wallets.settle("u_1", hold.hold_id, captured, spend=spend)
    spent = await LimitStore(redis).spend("u_1", "key_a")
    assert (spent.spent_micros, spent.spent_today_micros) == (1_150, 1_150)


async def test_an_unlimited_credentials_settle_writes_no_token_window(wallets, redis):
    await funded(wallets)
    hold = await wallets.hold("u_1", 1_000, spend=UNLIMITED)
    await wallets.settle("u_1", hold.hold_id, 700, spend=UNLIMITED)
    fields = await redis.hgetall(_limits_key("u_1", "key_a"))
    assert set(fields) == {b"spent", b"day", b"spent_day"}


async def test_a_limited_credentials_settle_still_counts_its_tokens(wallets, redis):
    await funded(wallets)
    hold = await wallets.hold("u_1", 1_000, spend=LIMITED)
    await wallets.settle("u_1", hold.hold_id, 700, spend=LIMITED)
    fields = await redis.hgetall(_limits_key("u_1", "key_a"))
    assert int(fields[b"tk"]) == 30 and int(fields[b"spent"]) == 700


async def test_yesterdays_spend_is_not_counted_today(wallets, redis):
    await funded(wallets)
    yesterday = int(time.time() * 1000) // 86_400_000 - 1
    await redis.hset(_limits_key("u_1", "key_a"), mapping={"spent": 5_000, "day": yesterday, "spent_day": 5_000})
    hold = await wallets.hold("u_1", 1_000, spend=UNLIMITED)
    await wallets.settle("u_1", hold.hold_id, 700, spend=UNLIMITED)
    spent = await LimitStore(redis).spend("u_1", "key_a")
    assert (spent.spent_micros, spent.spent_today_micros) == (5_700, 700)


async def test_a_grown_hold_on_an_unlimited_credential_has_its_reservation_replaced_by_the_capture(wallets, redis):
    # A stream that outgrows its hold reserves the growth on the credential (extend.lua),
    # limits or not: the settle must replace that reservation, not add the capture to it.
    await funded(wallets)
    hold = await wallets.hold("u_1", 1_000, spend=UNLIMITED)
    await wallets.extend("u_1", hold.hold_id, 500, current_micros=1_000, spend=UNLIMITED)
    assert (await LimitStore(redis).spend("u_1", "key_a")).spent_micros == 500
    await wallets.settle("u_1", hold.hold_id, 1_200, spend=UNLIMITED)
    spent = await LimitStore(redis).spend("u_1", "key_a")
    assert (spent.spent_micros, spent.spent_today_micros) == (1_200, 1_200)
    assert not [f for f in await redis.hkeys(_limits_key("u_1", "key_a")) if f.startswith(b"r:")]


async def test_a_replayed_settle_counts_the_spend_once(wallets, redis):
    await funded(wallets)
    hold = await wallets.hold("u_1", 1_000, spend=UNLIMITED)
    await wallets.settle("u_1", hold.hold_id, 700, spend=UNLIMITED)
    replay = await wallets.settle("u_1", hold.hold_id, 700, spend=UNLIMITED)
    assert replay.replayed
    assert (await LimitStore(redis).spend("u_1", "key_a")).spent_micros == 700


def test_a_key_with_any_limit_settles_as_limited_and_one_without_as_unlimited():
    from proxy.auth import Caller

    def caller(scopes: dict) -> Caller:
        return Caller(end_user_id="u_1", key_id="key_a", tier="default", ratecard_pin=None, scopes=scopes)

    assert credential_spend(caller({}), "req_1", 5).limited is False
    assert credential_spend(caller({"models": ["gpt-4o-mini"]}), "req_1", 5).limited is False
    for limit in ("requests_per_minute", "tokens_per_minute", "max_spend_micros", "max_daily_spend_micros"):
        assert credential_spend(caller({limit: 10}), "req_1", 5).limited is True


async def test_a_hold_keeps_only_the_caps_its_credential_has(wallets, redis):
    # An absent cap reads as none (-1) everywhere a hold's caps are read: it is not written.
    await funded(wallets)
    uncapped = await wallets.hold("u_1", 1_000, spend=UNLIMITED)
    daily = CredentialSpend("key_a", "req_2", max_daily_spend_micros=5_000)
    capped = await wallets.hold("u_1", 1_000, spend=daily)
    assert not {b"cap", b"daily_cap"} & set(await redis.hkeys(_hold_key("u_1", uncapped.hold_id)))
    fields = await redis.hgetall(_hold_key("u_1", capped.hold_id))
    assert fields[b"daily_cap"] == b"5000" and b"cap" not in fields
    for hold, spend in ((uncapped, UNLIMITED), (capped, daily)):
        await wallets.release("u_1", hold.hold_id, spend=spend)
