"""Ledger notes for what moves no money (proxy/events/notices.py): a call refused for funds, a stream cut for
them, a key stopped at its spend cap -- each written once (not once per refusal), then derived into its event.

Through the running app (the `gateway` fixture) with the official OpenAI SDK against the mock upstream, on the
private Redis. Notes are written in the background and events derived in the background: both are polled for
with a deadline, and "only one" is checked once the app's background work is done and the wallet's ledger is
derived. Every refusal is also checked to have moved no money: the ledger without its notes, the balance and
what is held are unchanged, to the micro.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import openai
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient

from pricing import Usage, price_usage
from proxy.appstate import BACKGROUND
from proxy.config import Config, EventsConfig
from proxy.events.model import Event, derived_event_id
from proxy.store import LedgerEntry, WalletStore
from proxy.store.events import EventStore
from tests.conftest import ADMIN, EndUser, money_ledger
from tests.mock_upstream import MockUpstream, make_usage
from tests.proxy.test_gateway_failures import gpt4o_mini, sdk

T = TypeVar("T")
DEADLINE_SECONDS = 20.0  # only so that an outcome that never comes fails the test instead of hanging it
EVENTS = EventsConfig(poll_interval_seconds=0.05, retry_base_seconds=0.05, retry_max_seconds=0.4)
CHAT: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 100}
# A stream whose upstream ignores max_tokens (the mock sends 300 words): it outruns its hold and must extend it.
RUNAWAY: dict[str, Any] = {**CHAT, "max_tokens": 5, "stream": True}
MOCK_USAGE = (200, 40)  # what the mock reports for a whole answer


# ------------------------------------------------------------ waiting


async def eventually(probe: Callable[[], Awaitable[T | None]], what: str) -> T:
    """The first truthy answer of `probe`, polled; an AssertionError naming `what` past the deadline."""
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE_SECONDS
    while True:
        found = await probe()
        if found:
            return found
        if loop.time() > end:
            raise AssertionError(f"{what}: not within {DEADLINE_SECONDS:g} s")
        await asyncio.sleep(0.02)


# ------------------------------------------------------------ fixtures and helpers


@pytest.fixture
def gateway_config(gateway_config: Config) -> Config:
    """The conftest's config with events polled often (the `gateway` fixture is built from this one)."""
    return gateway_config.model_copy(update={"events": EVENTS})


@pytest.fixture(autouse=True)
def priced_usage(mock_upstream: MockUpstream) -> None:
    mock_upstream.usage_override = make_usage(*MOCK_USAGE)


@pytest.fixture
def store(redis: aioredis.Redis) -> EventStore:
    return EventStore(redis)


def app_of(gateway: TestClient) -> web.Application:
    app = gateway.app
    assert app is not None
    return app


async def hold_for(gateway: TestClient, key: str, body: dict[str, Any] = CHAT) -> int:
    """What a call with `body` holds (its worst case), as the gateway quotes it."""
    resp = await gateway.post("/v1/estimate", json=body, headers={"Authorization": f"Bearer {key}"})
    assert resp.status == 200, await resp.text()
    return int((await resp.json())["estimated_cost_micros"])


def cost(gateway: TestClient) -> int:
    """What a completed CHAT is charged: the mock's usage at gpt-4o-mini's prices."""
    return price_usage(gpt4o_mini(gateway), Usage(prompt_tokens=MOCK_USAGE[0], completion_tokens=MOCK_USAGE[1])).price_micros


async def scoped_key(gateway: TestClient, user_id: str = "u_1", **scopes: Any) -> dict[str, Any]:
    resp = await gateway.post(f"/admin/end-users/{user_id}/keys", json={"name": "capped", **scopes}, headers=ADMIN)
    assert resp.status == 201, await resp.text()
    return dict(await resp.json())


async def refused(base_url: str, key: str, code: str, body: dict[str, Any] = CHAT) -> None:
    """One call through the SDK, refused with a 402 `code` before anything reached the upstream."""
    async with sdk(base_url, key) as client:
        with pytest.raises(openai.APIStatusError) as err:
            await client.chat.completions.create(**body)
    assert err.value.status_code == 402
    assert isinstance(err.value.body, dict) and err.value.body["code"] == code


async def runaway_stream(base_url: str, key: str) -> list[str]:
    """A stream the gateway cuts: what was relayed before the cut."""
    received: list[str] = []
    async with sdk(base_url, key) as client:
        with pytest.raises(openai.APIError):
            async with asyncio.timeout(DEADLINE_SECONDS):
                stream = await client.chat.completions.create(**RUNAWAY)
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        received.append(chunk.choices[0].delta.content)
    return received


async def money(wallets: WalletStore, user_id: str = "u_1") -> tuple[int, int, list[tuple[str, str, int]]]:
    """Balance, held, and the ledger without its notes: what a refusal must leave exactly as it was."""
    wallet = await wallets.get(user_id)
    assert wallet is not None
    return wallet.balance_micros, wallet.held_micros, [(e.id, e.type, e.amount_micros) for e in await money_ledger(wallets, user_id)]


async def notes(wallets: WalletStore, kind: str, user_id: str = "u_1") -> list[LedgerEntry]:
    """The wallet's notes of `kind`, oldest first."""
    return [e for e in reversed(await wallets.ledger(user_id, limit=500)) if e.type == kind]


async def wait_notes(wallets: WalletStore, kind: str, count: int, user_id: str = "u_1") -> list[LedgerEntry]:
    async def written() -> list[LedgerEntry]:
        found = await notes(wallets, kind, user_id)
        return found if len(found) >= count else []

    return await eventually(written, f"{count} {kind} note(s) on {user_id}")


async def quiet(gateway: TestClient, store: EventStore, wallets: WalletStore, user_id: str = "u_1") -> None:
    """Until the app's background work (notes among it) is done and the wallet's whole ledger is derived."""
    background = app_of(gateway)[BACKGROUND]

    async def idle() -> bool:
        return not background.tasks

    await eventually(idle, "the app's background work done")

    async def caught_up() -> bool:
        newest = await wallets.ledger(user_id, limit=1)
        return bool(newest) and (await store.wallet_state(user_id)).get("cursor") == newest[0].id

    await eventually(caught_up, f"{user_id}'s ledger derived")


async def wallet_events(store: EventStore, event_type: str, user_id: str = "u_1") -> list[Event]:
    """The wallet's events of `event_type` in the log, oldest first."""
    return [s.event for s in reversed(await store.latest(500)) if s.event.type == event_type and s.event.end_user == user_id]


# ------------------------------------------------------------ refused for funds


async def test_a_call_refused_for_funds_writes_a_depleted_note_then_a_wallet_depleted_event(
    base_url, gateway, make_end_user, mock_upstream, store, wallets
):
    user: EndUser = await make_end_user(funds=10)
    before = await money(wallets)
    await refused(base_url, user.key, "insufficient_quota")
    [note] = await wait_notes(wallets, "depleted", 1)
    assert (note.amount_micros, note.balance_micros, note.held_micros) == (0, 10, 0)
    assert note.details["reason"] == "refused" and note.details["model"] == "gpt-4o-mini" and note.details["request_id"]
    await quiet(gateway, store, wallets)
    [event] = await wallet_events(store, "wallet.depleted")
    assert event.id == derived_event_id("u_1", note.id, "wallet.depleted") and event.ledger_id == note.id
    assert event.data == {"reason": "refused", "available_micros": 10, "balance_micros": 10}
    assert await money(wallets) == before and mock_upstream.request_count == 0


async def test_twenty_concurrent_refusals_write_one_depleted_note(base_url, gateway, make_end_user, mock_upstream, store, wallets):
    user = await make_end_user(funds=10)
    before = await money(wallets)
    await asyncio.gather(*(refused(base_url, user.key, "insufficient_quota") for _ in range(20)))
    await quiet(gateway, store, wallets)
    assert len(await notes(wallets, "depleted")) == 1
    assert len(await wallet_events(store, "wallet.depleted")) == 1
    assert await money(wallets) == before and mock_upstream.request_count == 0


async def test_a_top_up_re_arms_the_depleted_note(base_url, gateway, make_end_user, store, wallets):
    user = await make_end_user(funds=10)
    await refused(base_url, user.key, "insufficient_quota")
    await wait_notes(wallets, "depleted", 1)
    resp = await gateway.post("/admin/wallets/u_1/top-ups", json={"amount_micros": 5}, headers={**ADMIN, "Idempotency-Key": "re-arm"})
    assert resp.status == 201, await resp.text()
    before = await money(wallets)
    await refused(base_url, user.key, "insufficient_quota")  # 15 micros: still far from a hold
    first, second = await wait_notes(wallets, "depleted", 2)
    await refused(base_url, user.key, "insufficient_quota")  # not re-armed since: no third note
    await quiet(gateway, store, wallets)
    ledger = [(e.type, e.balance_micros) for e in reversed(await wallets.ledger("u_1", limit=50)) if e.type in ("depleted", "top_up")]
    assert ledger == [("top_up", 10), ("depleted", 10), ("top_up", 15), ("depleted", 15)]
    events = await wallet_events(store, "wallet.depleted")
    assert [(e.ledger_id, e.data["balance_micros"]) for e in events] == [(first.id, 10), (second.id, 15)]
    assert await money(wallets) == before


# ------------------------------------------------------------ a stream cut for funds


async def test_a_stream_cut_for_funds_writes_a_depleted_note_with_reason_stream_cut(
    base_url, gateway, make_end_user, mock_upstream, store, wallets
):
    user = await make_end_user(funds=100)  # its hold (prompt + 5 tokens) fits; the 256-token extension does not
    mock_upstream.reply_words, mock_upstream.chunk_delay = 300, 0.01
    received = await runaway_stream(base_url, user.key)
    assert received, "the hold covers a few tokens, yet none was relayed"
    [note] = await wait_notes(wallets, "depleted", 1)
    await quiet(gateway, store, wallets)
    [charge] = [e for e in await wallets.ledger("u_1", limit=50) if e.type == "charge"]
    assert charge.details["outcome"] == "wallet_exhausted"
    assert note.details["reason"] == "stream_cut" and note.details["request_id"] == charge.details["request_id"]
    assert len(await notes(wallets, "depleted")) == 1
    [event] = await wallet_events(store, "wallet.depleted")
    assert event.ledger_id == note.id and event.data["reason"] == "stream_cut"
    assert (await wallets.get("u_1")).balance_micros == 100 + charge.amount_micros >= 0


# ------------------------------------------------------------ a key at its spend cap


async def test_a_key_refused_at_its_lifetime_cap_writes_one_note_then_an_event(
    base_url, gateway, make_end_user, mock_upstream, store, wallets
):
    user = await make_end_user()
    cap = await hold_for(gateway, user.key) - 1
    key = await scoped_key(gateway, max_spend_micros=cap)
    before = await money(wallets)
    await refused(base_url, key["key"], "spend_limit_exceeded")
    [note] = await wait_notes(wallets, "spend_cap_reached", 1)
    await asyncio.gather(*(refused(base_url, key["key"], "spend_limit_exceeded") for _ in range(20)))
    await quiet(gateway, store, wallets)
    assert await notes(wallets, "spend_cap_reached") == [note], "one note per key and day, however many refusals"
    assert note.amount_micros == 0
    assert (note.details["key_id"], note.details["period"], note.details["cap_micros"]) == (key["id"], "lifetime", cap)
    [event] = await wallet_events(store, "key.spend_cap_reached")
    assert event.ledger_id == note.id
    assert event.data == {"key_id": key["id"], "period": "lifetime", "cap_micros": cap}
    assert await notes(wallets, "depleted") == [], "the wallet could pay: it is not depleted"
    assert await money(wallets) == before and mock_upstream.request_count == 0


async def test_each_key_at_its_cap_writes_its_own_note(base_url, gateway, make_end_user, store, wallets):
    user = await make_end_user()
    cap = await hold_for(gateway, user.key) - 1
    keys = [await scoped_key(gateway, max_spend_micros=cap) for _ in range(2)]
    before = await money(wallets)
    for key in keys * 2:
        await refused(base_url, key["key"], "spend_limit_exceeded")
    await quiet(gateway, store, wallets)
    assert sorted(n.details["key_id"] for n in await notes(wallets, "spend_cap_reached")) == sorted(k["id"] for k in keys)
    assert sorted(e.data["key_id"] for e in await wallet_events(store, "key.spend_cap_reached")) == sorted(k["id"] for k in keys)
    assert await money(wallets) == before


async def test_a_key_refused_at_its_daily_cap_writes_a_note_saying_daily(
    base_url, gateway, make_end_user, mock_upstream, store, wallets
):
    user = await make_end_user()
    daily = cost(gateway) + await hold_for(gateway, user.key) - 1  # one call fits, a second one's hold does not
    key = await scoped_key(gateway, max_daily_spend_micros=daily, max_spend_micros=1_000_000)
    async with sdk(base_url, key["key"]) as client:
        await client.chat.completions.create(**CHAT)
    await quiet(gateway, store, wallets)
    assert (await wallets.get("u_1")).balance_micros == 10_000_000 - cost(gateway)
    before = await money(wallets)
    await refused(base_url, key["key"], "spend_limit_exceeded")
    await refused(base_url, key["key"], "spend_limit_exceeded")
    [note] = await wait_notes(wallets, "spend_cap_reached", 1)
    await quiet(gateway, store, wallets)
    assert len(await notes(wallets, "spend_cap_reached")) == 1
    assert (note.details["key_id"], note.details["period"], note.details["cap_micros"]) == (key["id"], "daily", daily)
    [event] = await wallet_events(store, "key.spend_cap_reached")
    assert event.data == {"key_id": key["id"], "period": "daily", "cap_micros": daily}
    assert await money(wallets) == before and mock_upstream.request_count == 1


async def test_a_stream_cut_at_a_keys_lifetime_cap_writes_a_lifetime_note(
    base_url, gateway, make_end_user, mock_upstream, store, wallets
):
    user = await make_end_user()
    cap = await hold_for(gateway, user.key, RUNAWAY) + 50  # the hold fits; a 256-token extension does not
    key = await scoped_key(gateway, max_spend_micros=cap)
    mock_upstream.reply_words, mock_upstream.chunk_delay = 300, 0.01
    await runaway_stream(base_url, key["key"])
    [note] = await wait_notes(wallets, "spend_cap_reached", 1)
    await quiet(gateway, store, wallets)
    [charge] = [e for e in await wallets.ledger("u_1", limit=50) if e.type == "charge"]
    assert charge.details["outcome"] == "spend_limit_reached"
    assert (note.details["key_id"], note.details["period"], note.details["cap_micros"]) == (key["id"], "lifetime", cap)
    assert note.details["request_id"] == charge.details["request_id"]
    [event] = await wallet_events(store, "key.spend_cap_reached")
    assert event.data == {"key_id": key["id"], "period": "lifetime", "cap_micros": cap}
    assert await notes(wallets, "depleted") == []


async def test_a_stream_cut_at_a_keys_daily_cap_writes_a_daily_note(base_url, gateway, make_end_user, mock_upstream, store, wallets):
    """The key also has a (distant) lifetime cap: the note names the cap that stopped the stream."""
    user = await make_end_user()
    daily = await hold_for(gateway, user.key, RUNAWAY) + 50  # the hold fits; a 256-token extension does not
    key = await scoped_key(gateway, max_daily_spend_micros=daily, max_spend_micros=5_000_000)
    mock_upstream.reply_words, mock_upstream.chunk_delay = 300, 0.01
    await runaway_stream(base_url, key["key"])
    [note] = await wait_notes(wallets, "spend_cap_reached", 1)
    await quiet(gateway, store, wallets)
    [charge] = [e for e in await wallets.ledger("u_1", limit=50) if e.type == "charge"]
    assert charge.details["outcome"] == "spend_limit_reached"
    assert (note.details["key_id"], note.details["period"], note.details["cap_micros"]) == (key["id"], "daily", daily)


# ------------------------------------------------------------ a call served clamped was not refused

# No max_tokens: the worst case is gpt-4o-mini's 16,384 output tokens (~12,300 micros), which these budgets
# cannot cover, while a clamped answer of at least the card's 256 tokens fits: the call is served, not refused.
UNBOUNDED: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Name three rivers"}]}


async def test_a_call_served_clamped_for_a_small_wallet_writes_no_depleted_note(base_url, gateway, make_end_user, store, wallets):
    user = await make_end_user(funds=2_000)
    async with sdk(base_url, user.key) as client:
        raw = await client.chat.completions.with_raw_response.create(**UNBOUNDED)
    assert raw.http_response.status_code == 200 and raw.headers.get("X-Max-Tokens-Clamped")
    await quiet(gateway, store, wallets)
    assert await notes(wallets, "depleted") == [], "a call that was served is not a refusal"
    assert await wallet_events(store, "wallet.depleted") == []


async def test_a_call_served_clamped_under_a_keys_cap_writes_no_spend_cap_note(base_url, gateway, make_end_user, store, wallets):
    await make_end_user()
    key = await scoped_key(gateway, max_spend_micros=2_000)
    async with sdk(base_url, key["key"]) as client:
        raw = await client.chat.completions.with_raw_response.create(**UNBOUNDED)
    assert raw.http_response.status_code == 200 and raw.headers.get("X-Max-Tokens-Clamped")
    await quiet(gateway, store, wallets)
    assert await notes(wallets, "spend_cap_reached") == [], "a call that was served did not reach the cap"
    assert await wallet_events(store, "key.spend_cap_reached") == []
