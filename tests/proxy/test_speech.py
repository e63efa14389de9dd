"""Speech (`POST /v1/audio/speech`) through the official SDK: billed per character of `input` (the bundled
card's tts-1: 18.75 USD per 1M characters, so 18.75 micros a character), the audio relayed as it comes."""

from __future__ import annotations

import asyncio
import math

import openai
import pytest

TEXT = "The quick brown fox jumps over the lazy dog."  # 44 characters -> 825 micros


def sdk(base_url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0)


async def settled(wallets, user_id: str = "u_1"):
    for _ in range(200):
        if (await wallets.get(user_id)).held_micros == 0:
            return [e for e in await wallets.ledger(user_id, limit=20) if e.type in ("charge", "release")][0]
        await asyncio.sleep(0.02)
    raise AssertionError("the hold was never closed")


async def test_speech_is_charged_per_input_character_and_its_audio_relayed_whole(base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    async with sdk(base_url, user.key).audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input=TEXT) as response:
        audio = await response.read()
        cost = response.headers["X-Usage-Cost"]
    assert len(audio) == 8 * 1024
    entry = await settled(wallets)
    assert entry.type == "charge" and -entry.amount_micros == math.ceil(44 * 18.75) == 825
    assert cost == "0.000825" and entry.details["prompt_tokens"] == 44
    assert (await wallets.get("u_1")).balance_micros == 10_000_000 - 825


async def test_a_listener_gone_mid_audio_still_pays_the_input(base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    mock_upstream.speech_chunks, mock_upstream.chunk_delay = 50, 0.05
    async with sdk(base_url, user.key).audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input=TEXT) as response:
        async for _ in response.iter_bytes(1024):
            break
    assert await mock_upstream.wait_disconnected(timeout=5)
    entry = await settled(wallets)
    assert entry.type == "charge" and -entry.amount_micros == 825 and entry.details["outcome"] == "client_disconnected"


async def test_an_upstream_refusal_costs_nothing(base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    mock_upstream.fail_status = 500
    with pytest.raises(openai.APIStatusError):
        await sdk(base_url, user.key).audio.speech.create(model="tts-1", voice="alloy", input=TEXT)
    assert (await settled(wallets)).type == "release"
    assert (await wallets.get("u_1")).balance_micros == 10_000_000


@pytest.mark.parametrize("text", ["", "x" * 4097])
async def test_input_outside_1_to_4096_characters_is_a_400_and_nothing_is_forwarded(gateway, make_end_user, mock_upstream,
                                                                                    wallets, text):
    user = await make_end_user()
    resp = await gateway.post("/v1/audio/speech", json={"model": "tts-1", "voice": "alloy", "input": text},
                              headers={"Authorization": f"Bearer {user.key}"})
    assert resp.status == 400 and (await resp.json())["error"]["param"] == "input"
    assert mock_upstream.requests == []


async def test_a_wallet_that_cannot_pay_the_characters_is_a_402(base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user(funds=824)
    with pytest.raises(openai.APIStatusError) as err:
        await sdk(base_url, user.key).audio.speech.create(model="tts-1", voice="alloy", input=TEXT)
    assert err.value.status_code == 402 and mock_upstream.requests == []
