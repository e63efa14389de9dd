"""Every way a metered call can end closes its hold exactly once and bills what the upstream did (issue 8).

Black-box: through the running app, on a real Redis, with the official `openai` SDK (a raw client only where the
wire itself is checked). Each test ends with `assert_no_open_holds`: no hold left active, and none that the
reaper's index has lost (a hold outside the index can never expire). The `redis` fixture audits the ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from pricing import Usage, count_text_tokens, estimate_prompt_tokens, price_usage
from proxy.app import create_app
from proxy.appstate import METERING
from proxy.config import Config, load_config
from proxy.store import HOLD_INDEX_KEY, AccountStore, LedgerEntry, WalletStore, connect
from tests.conftest import assert_ledger_invariants
from tests.mock_upstream import MockUpstream, make_usage, reply_chunks
from tests.proxy.test_gateway_failures import CHAT, gpt4o_mini, ledger_types, sdk
from tests.redis_server import RedisServer

# The mock reports this usage wherever a test checks that the upstream's usage (not a count) was billed:
# 100 x 0.1875 + 20 x 0.75 = 33.75 -> 34 micros, and no count of the mock's 20-word reply comes to 100/20.
UPSTREAM_USAGE = make_usage(100, 20)
UPSTREAM_PRICE = 34
FUNDS = 10_000_000


# ------------------------------------------------------------------ helpers


async def assert_no_open_holds(redis: aioredis.Redis, wallets: WalletStore, user_id: str) -> None:
    """No hold left active on `user_id`'s wallet, and none of its active holds missing from the reaper's index."""
    holds = await wallets.active_holds(user_id)
    unindexed = [h for h in holds if await redis.zscore(HOLD_INDEX_KEY, f"{user_id}|{h}") is None]
    # Checked first: a hold outside the index is the worse failure (it never expires), so name it.
    assert not unindexed, f"active holds the reaper can never find: {unindexed}"
    assert not holds, f"holds still active: {holds}"
    assert (await wallets.get(user_id)).held_micros == 0


async def wait_until(
    check: Callable[[], Awaitable[bool]], timeout: float, failure: str,
    explain: Callable[[], Awaitable[str]] | None = None,
) -> None:
    """Poll `check` until it holds; fail with `failure` (and what `explain` says) once `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{failure}; {await explain()}" if explain else failure)
        await asyncio.sleep(0.02)


async def describe_wallet(wallets: WalletStore, user_id: str) -> str:
    state = await wallets.get(user_id)
    types = [e.type for e in reversed(await wallets.ledger(user_id, limit=200))]
    return f"held {state.held_micros}, active holds {await wallets.active_holds(user_id)}, ledger {types}"


async def wait_closed(wallets: WalletStore, user_id: str, timeout: float, failure: str, *, charges_expected: int = 1) -> None:
    """Wait until no hold is left and `charges_expected` charges are in the ledger."""
    async def closed() -> bool:
        return (await wallets.get(user_id)).held_micros == 0 and len(await charges(wallets, user_id)) >= charges_expected

    await wait_until(closed, timeout, failure, lambda: describe_wallet(wallets, user_id))


async def charges(wallets: WalletStore, user_id: str) -> list[LedgerEntry]:
    return [e for e in reversed(await wallets.ledger(user_id, limit=200)) if e.type == "charge"]


def price(client: TestClient, prompt_tokens: int, completion_tokens: int) -> int:
    usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
    return price_usage(gpt4o_mini(client), usage).price_micros


def reply_text(words: int) -> str:
    return "".join(reply_chunks(words))


async def gateway_with(aiohttp_client, gateway_config: Config, **overrides) -> TestClient:
    """The `gateway` fixture's app with some config fields changed (validated, as `metergate serve` would)."""
    config = load_config(**{**gateway_config.model_dump(), **overrides})
    return await aiohttp_client(create_app(config), server_kwargs={"handler_cancellation": True})


def v1(client: TestClient) -> str:
    return str(client.make_url("/v1"))


async def wait_forwarded(mock: MockUpstream) -> None:
    """Until the call reached the upstream: its hold is taken by then."""
    async def forwarded() -> bool:
        return mock.request_count >= 1

    await wait_until(forwarded, 5, "the call never reached the upstream")


async def leave_once_forwarded(mock: MockUpstream, call: asyncio.Task) -> None:
    """Drop the client's call as soon as it reached the upstream."""
    await wait_forwarded(mock)
    call.cancel()
    with contextlib.suppress(asyncio.CancelledError, openai.APIError):
        await call


# ------------------------------------------------- 1. SSE framing


@pytest.mark.parametrize("line_ending", ["\n", "\r\n", "\r"], ids=["lf", "crlf", "cr"])
async def test_a_stream_framed_with_any_sse_line_ending_is_relayed_and_charged_the_upstream_usage(
    base_url, gateway, make_end_user, mock_upstream, redis, wallets, line_ending
):
    user = await make_end_user()
    mock_upstream.line_ending = line_ending
    mock_upstream.usage_override = UPSTREAM_USAGE
    stream = await sdk(base_url, user.key).chat.completions.create(**CHAT, stream=True)
    async with asyncio.timeout(10):
        pieces = [c.choices[0].delta.content async for c in stream if c.choices and c.choices[0].delta.content]
    assert pieces == list(reply_chunks(20))
    await wait_closed(wallets, user.id, 5, "the hold was never closed")
    [charge] = await charges(wallets, user.id)
    d = charge.details
    assert (d["outcome"], d["usage_source"]) == ("completed", "upstream")
    assert (d["prompt_tokens"], d["completion_tokens"]) == (100, 20)
    assert -charge.amount_micros == d["price_micros"] == UPSTREAM_PRICE
    assert (await wallets.get(user.id)).balance_micros == FUNDS - UPSTREAM_PRICE
    await assert_no_open_holds(redis, wallets, user.id)


# ------------------------------------------------- 2-3. the client leaves before the first byte


async def test_a_client_that_leaves_a_stream_before_its_first_byte_pays_the_prompt_at_once(
    base_url, gateway, make_end_user, mock_upstream, redis, wallets
):
    user = await make_end_user()
    mock_upstream.first_byte_delay = 1.5
    body = {**CHAT, "stream": True}
    call = asyncio.create_task(sdk(base_url, user.key).chat.completions.create(**body))
    await leave_once_forwarded(mock_upstream, call)
    # The upstream is closed before it would have answered (1.5 s after the request).
    assert await mock_upstream.wait_disconnected(timeout=1.5), "the upstream connection was left open"
    # The hold TTL is 600 s: a hold still active 1.5 s after the client left is waiting for the reaper.
    await wait_closed(wallets, user.id, 1.5, "the hold outlived the client that left")
    [charge] = await charges(wallets, user.id)
    d = charge.details
    prompt = estimate_prompt_tokens(body)
    assert (d["outcome"], d["prompt_tokens"], d["completion_tokens"]) == ("client_disconnected", prompt, 0)
    # The provider bills the prompt it received; nothing more was generated.
    assert -charge.amount_micros == d["price_micros"] == price(gateway, prompt, 0)
    assert mock_upstream.streams_completed == 0
    await assert_no_open_holds(redis, wallets, user.id)


async def test_a_client_that_leaves_a_non_streamed_call_pays_the_answer_read_in_the_background(
    base_url, gateway, make_end_user, mock_upstream, redis, wallets
):
    user = await make_end_user()
    mock_upstream.first_byte_delay = 1.0
    mock_upstream.usage_override = UPSTREAM_USAGE
    call = asyncio.create_task(sdk(base_url, user.key).chat.completions.create(**CHAT))
    await leave_once_forwarded(mock_upstream, call)

    async def answered() -> bool:
        return mock_upstream.replies_completed + mock_upstream.replies_disconnected > 0

    await wait_until(answered, 5, "the upstream never finished the request")
    assert (mock_upstream.replies_completed, mock_upstream.replies_disconnected) == (1, 0), "the proxy stopped reading the answer"
    await wait_closed(wallets, user.id, 5, "the hold was never closed")
    [charge] = await charges(wallets, user.id)
    d = charge.details
    assert (d["outcome"], d["usage_source"]) == ("client_disconnected", "upstream")
    assert (d["prompt_tokens"], d["completion_tokens"]) == (100, 20)
    assert -charge.amount_micros == UPSTREAM_PRICE
    await assert_no_open_holds(redis, wallets, user.id)


# ------------------------------------------------- 4. bad input is refused before any money moves


async def assert_refused_before_the_hold(resp: aiohttp.ClientResponse, mock: MockUpstream, redis, wallets, user_id: str) -> dict:
    assert resp.status == 400, await resp.text()
    body = await resp.json()
    assert set(body) == {"error"} and body["error"]["message"] and body["error"]["type"]
    assert await ledger_types(wallets, user_id) == ["open", "top_up"]
    assert mock.request_count == 0
    await assert_no_open_holds(redis, wallets, user_id)
    return body["error"]


@pytest.mark.parametrize("stream_options", ["x", [1], 5], ids=["string", "list", "number"])
async def test_stream_options_that_are_not_an_object_are_a_400_before_any_hold(
    gateway, make_end_user, mock_upstream, redis, wallets, stream_options
):
    user = await make_end_user()
    body = {**CHAT, "stream": True, "stream_options": stream_options}
    resp = await gateway.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {user.key}"})
    error = await assert_refused_before_the_hold(resp, mock_upstream, redis, wallets, user.id)
    assert error["param"] == "stream_options"


def nested_object_schema(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


async def test_tools_nested_too_deep_to_forward_are_a_400_before_any_hold(gateway, make_end_user, mock_upstream, redis, wallets):
    user = await make_end_user()
    tool = {"type": "function", "function": {"name": "f", "parameters": nested_object_schema(150)}}  # ~300 JSON levels
    raw = json.dumps({**CHAT, "tools": [tool]}).encode()
    # Valid JSON the proxy can read, that orjson cannot write back out to the upstream.
    with pytest.raises(orjson.JSONEncodeError):
        orjson.dumps(orjson.loads(raw))
    resp = await gateway.post(
        "/v1/chat/completions", data=raw, headers={"Authorization": f"Bearer {user.key}", "Content-Type": "application/json"}
    )
    await assert_refused_before_the_hold(resp, mock_upstream, redis, wallets, user.id)


# ------------------------------------------------- 5. the store pauses while a call settles


async def pause_redis(url: str, *, flush_scripts: bool, pause_ms: int) -> None:
    """On a connection of its own: optionally drop the script cache, then pause every client."""
    host, port = url.removeprefix("redis://").split("/")[0].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        commands = ([b"SCRIPT FLUSH"] if flush_scripts else []) + [b"CLIENT PAUSE %d ALL" % pause_ms]
        for command in commands:
            writer.write(command + b"\r\n")
            await writer.drain()
            assert await asyncio.wait_for(reader.readline(), 2) == b"+OK\r\n", command
    finally:
        writer.close()


async def settle_into_a_paused_store(aiohttp_client, gateway_config, make_end_user, mock_upstream, redis_server, *,
                                    flush_scripts: bool) -> tuple[aiohttp.ClientResponse, Any]:
    """A non-streamed call whose settle meets a store paused for 2.5 s: its response, and its end user."""
    app = await gateway_with(aiohttp_client, gateway_config, redis_timeout_seconds=1)
    user = await make_end_user()
    mock_upstream.first_byte_delay = 0.5
    mock_upstream.usage_override = UPSTREAM_USAGE
    call = asyncio.create_task(app.post("/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {user.key}"}))
    await wait_forwarded(mock_upstream)
    # The upstream answers in ~0.5 s, inside the 2.5 s pause: the settle meets a store that does not answer.
    await pause_redis(redis_server.url, flush_scripts=flush_scripts, pause_ms=2500)
    return await asyncio.wait_for(call, 10), user


@pytest.mark.parametrize("flush_scripts", [True, False], ids=["script-flush", "no-flush"])
async def test_a_store_paused_during_the_settle_answers_settlement_pending_and_charges_once(
    aiohttp_client, gateway_config, make_end_user, mock_upstream, redis, redis_server, wallets, flush_scripts
):
    resp, user = await settle_into_a_paused_store(aiohttp_client, gateway_config, make_end_user, mock_upstream,
                                                  redis_server, flush_scripts=flush_scripts)
    assert resp.status == 200, await resp.text()
    assert resp.headers.get("X-Settlement") == "pending"
    assert (await resp.json())["choices"][0]["message"]["content"] == reply_text(20)
    await wait_closed(wallets, user.id, 10, "the charge never landed once the store was back")
    [charge] = await charges(wallets, user.id)
    assert (charge.details["usage_source"], charge.details["completion_tokens"]) == ("upstream", 20)
    assert -charge.amount_micros == UPSTREAM_PRICE
    assert not {"release", "expire"} & set(await ledger_types(wallets, user.id))
    await assert_no_open_holds(redis, wallets, user.id)


async def test_a_close_that_waits_out_a_store_pause_is_recorded_once_with_its_charge(
    aiohttp_client, gateway_config, make_end_user, mock_upstream, redis, redis_server, wallets, caplog
):
    # A whole answer closes in its own task; an outage hands the retrying to a task of its own,
    # and only that one, when the charge lands, writes the call's line and counts it.
    caplog.set_level(logging.INFO, logger="metergate.calls")
    resp, user = await settle_into_a_paused_store(aiohttp_client, gateway_config, make_end_user, mock_upstream,
                                                  redis_server, flush_scripts=False)
    assert resp.headers.get("X-Settlement") == "pending"
    await wait_closed(wallets, user.id, 10, "the charge never landed once the store was back")

    async def recorded() -> bool:
        return any(r.name == "metergate.calls" for r in caplog.records)

    await wait_until(recorded, 5, "the call was never recorded")
    await asyncio.sleep(0.2)  # a second record would follow at once
    [line] = [r for r in caplog.records if r.name == "metergate.calls"]
    assert line.fields["cost_micros"] == UPSTREAM_PRICE  # type: ignore[attr-defined]
    await assert_no_open_holds(redis, wallets, user.id)


async def test_a_whole_answer_is_read_and_closed_in_one_background_task(gateway, make_end_user, mock_upstream, redis, wallets):
    spawned: list[str] = []
    background = gateway.app[METERING].background
    spawn = background.spawn

    def counting_spawn(work):
        spawned.append(work.__qualname__)
        return spawn(work)

    background.spawn = counting_spawn  # type: ignore[method-assign]
    user = await make_end_user()
    resp = await gateway.post("/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {user.key}"})
    assert resp.status == 200, await resp.text()
    assert spawned == ["_answering"]  # the whole answer (its close included): no second task for the close
    assert [c.type for c in await charges(wallets, user.id)] == ["charge"]
    await assert_no_open_holds(redis, wallets, user.id)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a_client_gone_while_its_hold_waits_on_the_store_is_never_forwarded_and_the_hold_is_released(
    gateway, make_end_user, mock_upstream, redis, redis_server, wallets, stream
):
    user = await make_end_user()
    host, port = redis_server.url.removeprefix("redis://").split("/")[0].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"CLIENT PAUSE 1500 WRITE\r\n")  # reads (the key lookup) go on; the hold waits
    assert await asyncio.wait_for(reader.readline(), 2) == b"+OK\r\n"
    writer.close()
    with pytest.raises(asyncio.TimeoutError):
        async with asyncio.timeout(0.4):
            await gateway.post("/v1/chat/completions", json={**CHAT, "stream": stream},
                               headers={"Authorization": f"Bearer {user.key}"})

    async def released() -> bool:
        return "release" in await ledger_types(wallets, user.id)

    await wait_until(released, 10, "the hold placed for a client that had left was not released",
                     lambda: describe_wallet(wallets, user.id))
    assert await ledger_types(wallets, user.id) == ["open", "top_up", "release"]
    assert mock_upstream.request_count == 0
    await assert_no_open_holds(redis, wallets, user.id)


# ------------------------------------------------- 6. the store goes down under streams in flight


async def read_raw_stream(client: TestClient, key: str, received: list[bytes], request_ids: dict[int, str]) -> bytes:
    """One stream read off the wire, to see what the proxy wrote after the store failed."""
    headers = {"Authorization": f"Bearer {key}"}
    async with client.session.post(client.make_url("/v1/chat/completions"), json={**CHAT, "stream": True}, headers=headers) as resp:
        assert resp.status == 200
        request_ids[3] = resp.headers["X-Request-Id"]
        async for piece in resp.content.iter_any():
            received.append(piece)
    return b"".join(received)


def content_of_raw_stream(raw: bytes) -> list[str]:
    pieces = []
    for line in raw.splitlines():
        if line.startswith(b"data: {"):
            chunk = orjson.loads(line[6:])
            for choice in chunk.get("choices") or ():
                if (choice.get("delta") or {}).get("content"):
                    pieces.append(choice["delta"]["content"])
    return pieces


async def test_streams_in_flight_when_the_store_goes_down_end_with_an_error_and_are_charged_once_it_is_back(
    aiohttp_client, gateway_config, mock_upstream, tmp_path: Path
):
    server = RedisServer(tmp_path, persistent=True)
    await asyncio.to_thread(server.start)
    store = connect(server.url)
    readers: list[asyncio.Task] = []
    try:
        wallets, accounts = WalletStore(store, hold_ttl_ms=60_000), AccountStore(store)
        await wallets.open("u_1", profile={"tier": "default", "metadata": {}})
        await wallets.top_up("u_1", FUNDS, idempotency_key="seed-u_1")
        _, key = await accounts.create_key("u_1")
        app = await gateway_with(
            aiohttp_client, gateway_config, redis_url=server.url, checkpoint_interval_seconds=0.3, redis_timeout_seconds=1,
        )
        mock_upstream.reply_words, mock_upstream.chunk_delay = 200, 0.05  # 10 s streams
        client = sdk(v1(app), key)
        pieces: list[list[str]] = [[], [], []]
        request_ids: dict[int, str] = {}
        raw_received: list[bytes] = []

        async def read_sdk_stream(i: int) -> BaseException | None:
            stream = await client.chat.completions.create(**CHAT, stream=True)
            request_ids[i] = stream.response.headers["X-Request-Id"]
            try:
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        pieces[i].append(chunk.choices[0].delta.content)
            except openai.APIError as exc:
                return exc
            return None

        readers = [asyncio.create_task(read_sdk_stream(i)) for i in range(3)]
        readers.append(asyncio.create_task(read_raw_stream(app, key, raw_received, request_ids)))

        async def all_streaming() -> bool:
            return all(len(p) >= 3 for p in pieces) and len(content_of_raw_stream(b"".join(raw_received))) >= 3

        await wait_until(all_streaming, 5, "the streams never started")
        await asyncio.to_thread(server.stop)

        _, hung = await asyncio.wait(readers, timeout=10)
        assert not hung, f"{len(hung)} of 4 streams still open 10 s after the store went down"
        for i, reader in enumerate(readers[:3]):
            exc = reader.result()
            # An in-band error event (APIError with its body), not a broken transport (APIConnectionError).
            assert type(exc) is openai.APIError and isinstance(exc.body, dict), f"stream {i} ended with {exc!r}"
            assert len(pieces[i]) < 200
        raw = readers[3].result()  # raises if the chunked body was broken by a second response
        assert b"HTTP/1." not in raw
        events = [e for e in raw.replace(b"\r\n", b"\n").split(b"\n\n") if e.strip()]
        assert events[-1].startswith(b"data: ") and "error" in orjson.loads(events[-1][6:])

        await asyncio.to_thread(server.start)  # same port, same AOF
        await wait_closed(wallets, "u_1", 15, "the calls were not all charged once the store was back", charges_expected=4)
        streamed = [*pieces, content_of_raw_stream(raw)]
        received = {request_ids[i]: sum(count_text_tokens(p) for p in streamed[i]) for i in range(4)}
        all_charges = await charges(wallets, "u_1")
        by_request = {c.details["request_id"]: c for c in all_charges}
        assert len(all_charges) == 4 and sorted(by_request) == sorted(received), "not one charge per call"
        prompt = estimate_prompt_tokens({**CHAT, "stream": True})
        for rid, charge in by_request.items():
            d = charge.details
            assert (d["outcome"], d["usage_source"], d["prompt_tokens"]) == ("store_unavailable", "counted", prompt)
            # What was relayed, give or take the one event in flight when the stream was cut.
            assert received[rid] <= d["completion_tokens"] <= received[rid] + 2
            assert -charge.amount_micros == price(app, prompt, d["completion_tokens"])
        await assert_no_open_holds(store, wallets, "u_1")
        await assert_ledger_invariants(wallets)
    finally:
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        await store.aclose()
        await asyncio.to_thread(server.stop)


# ------------------------------------------------- 7. a non-streamed call outlives the hold TTL


async def test_a_non_streamed_call_longer_than_the_hold_ttl_keeps_its_hold_and_is_charged(
    aiohttp_client, gateway_config, make_end_user, mock_upstream, redis, wallets
):
    app = await gateway_with(aiohttp_client, gateway_config, hold_ttl_seconds=1, reaper_interval_seconds=0.05)
    user = await make_end_user()
    mock_upstream.first_byte_delay = 2.5  # against a 1 s hold TTL and a busy reaper
    mock_upstream.usage_override = UPSTREAM_USAGE
    reply = await sdk(v1(app), user.key).chat.completions.create(**CHAT)
    assert reply.choices[0].message.content == reply_text(20)
    await wait_closed(wallets, user.id, 5, "the hold was never closed")
    [charge] = await charges(wallets, user.id)
    assert (charge.details["outcome"], charge.details["usage_source"]) == ("completed", "upstream")
    assert -charge.amount_micros == UPSTREAM_PRICE
    assert "expire" not in await ledger_types(wallets, user.id)
    await assert_no_open_holds(redis, wallets, user.id)


# ------------------------------------------------- 8. an upstream that ignores max_tokens, in bursts


async def test_a_runaway_burst_is_cut_before_it_relays_what_the_wallet_cannot_pay(
    base_url, gateway, make_end_user, mock_upstream, redis, wallets
):
    mock_upstream.reply_words, mock_upstream.words_per_chunk = 30_000, 1000  # max_tokens is ignored
    body = {**CHAT, "max_tokens": 5, "stream": True}
    prompt = estimate_prompt_tokens(body)
    chunk_tokens = [count_text_tokens(p) for p in reply_chunks(30_000, 1000)[:3]]
    # Enough for the prompt and about two and a half of the upstream's chunks.
    funds = price(gateway, prompt, chunk_tokens[0] + chunk_tokens[1] + chunk_tokens[2] // 2)
    user = await make_end_user(funds=funds)
    received: list[str] = []
    with pytest.raises(openai.APIError) as err:
        async with asyncio.timeout(10):
            stream = await sdk(base_url, user.key).chat.completions.create(**body)
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    received.append(chunk.choices[0].delta.content)
    assert err.value.body["code"] == "insufficient_quota"
    assert received, "the wallet covers about two chunks, yet none was relayed"
    await wait_closed(wallets, user.id, 5, "the hold was never closed")
    [charge] = await charges(wallets, user.id)
    d = charge.details
    got = sum(count_text_tokens(p) for p in received)
    assert d["shortfall_micros"] == 0, "tokens were relayed that the wallet could not pay for"
    assert (d["prompt_tokens"], d["completion_tokens"]) == (prompt, got)
    assert -charge.amount_micros == price(gateway, prompt, got)
    assert (await wallets.get(user.id)).balance_micros == funds + charge.amount_micros >= 0
    await assert_no_open_holds(redis, wallets, user.id)
