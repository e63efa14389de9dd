"""Transcription (`POST /v1/audio/transcriptions`) through the official SDK: a multipart upload held at its
longest possible duration, charged by the second of the duration the transcript reports. The bundled
card's whisper-1: 0.0075 USD a minute = 125 micros a second; mp3 bounded at 1,000 bytes a second."""

from __future__ import annotations

import asyncio
import io

import openai
import pytest


def sdk(base_url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0)


def mp3(size: int) -> tuple[str, io.BytesIO]:
    return "talk.mp3", io.BytesIO(b"\xff\xfb" + b"\0" * (size - 2))


async def settled(wallets, user_id: str = "u_1"):
    for _ in range(200):
        if (await wallets.get(user_id)).held_micros == 0:
            return [e for e in await wallets.ledger(user_id, limit=20) if e.type in ("charge", "release")][0]
        await asyncio.sleep(0.02)
    raise AssertionError("the hold was never closed")


async def test_a_transcription_is_charged_the_reported_duration_by_the_second(base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    mock_upstream.transcription_seconds = 7.3  # -> 8 s
    raw = await sdk(base_url, user.key).audio.transcriptions.with_raw_response.create(model="whisper-1", file=mp3(20_000))
    assert raw.parse().text == "hello from the mock"
    entry = await settled(wallets)
    assert entry.type == "charge" and -entry.amount_micros == 8 * 125 == 1_000
    assert entry.details["usage_source"] == "upstream" and raw.headers["X-Usage-Cost"] == "0.001000"
    forwarded = mock_upstream.requests[-1].json
    assert (forwarded["model"], forwarded["file_size"], forwarded["filename"]) == ("whisper-1", 20_000, "talk.mp3")


async def test_the_hold_is_the_uploads_longest_possible_duration(base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    mock_upstream.first_byte_delay = 0.5
    call = asyncio.create_task(sdk(base_url, user.key).audio.transcriptions.create(model="whisper-1", file=mp3(20_000)))
    for _ in range(200):
        held = (await wallets.get("u_1")).held_micros
        if held:
            break
        await asyncio.sleep(0.01)
    await call
    assert held == 20 * 125  # 20,000 bytes of mp3 are at most 20 s
    await settled(wallets)


async def test_verbose_json_reports_its_duration_and_is_charged_it(base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    mock_upstream.transcription_seconds = 3.0
    await sdk(base_url, user.key).audio.transcriptions.create(model="whisper-1", file=mp3(20_000),
                                                             response_format="verbose_json")
    assert -(await settled(wallets)).amount_micros == 3 * 125


async def test_a_text_answer_reports_no_duration_and_is_charged_the_bound(base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    text = await sdk(base_url, user.key).audio.transcriptions.create(model="whisper-1", file=mp3(5_000),
                                                                    response_format="text")
    assert "hello from the mock" in text
    entry = await settled(wallets)
    assert -entry.amount_micros == 5 * 125 and entry.details["usage_source"] == "bound"


async def test_an_upstream_error_costs_nothing(base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    mock_upstream.fail_status = 500
    with pytest.raises(openai.APIStatusError):
        await sdk(base_url, user.key).audio.transcriptions.create(model="whisper-1", file=mp3(5_000))
    assert (await settled(wallets)).type == "release"
    assert (await wallets.get("u_1")).balance_micros == 10_000_000


async def test_a_format_the_card_does_not_take_is_a_400_and_nothing_is_forwarded(base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    with pytest.raises(openai.BadRequestError) as err:
        await sdk(base_url, user.key).audio.transcriptions.create(model="whisper-1", file=("talk.aiff", io.BytesIO(b"x" * 99)))
    assert err.value.body["code"] == "unsupported_audio_format"
    assert mock_upstream.requests == []


async def test_an_upload_the_wallet_cannot_cover_is_a_402(base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user(funds=1_000)  # 20 s of mp3 may cost 2,500 micros
    with pytest.raises(openai.APIStatusError) as err:
        await sdk(base_url, user.key).audio.transcriptions.create(model="whisper-1", file=mp3(20_000))
    assert err.value.status_code == 402 and mock_upstream.requests == []


@pytest.mark.parametrize("fields, param", [({"model": "whisper-1"}, "file"), ({}, "file")])
async def test_a_malformed_upload_is_a_400(gateway, make_end_user, mock_upstream, wallets, fields, param):
    import aiohttp

    user = await make_end_user()
    form = aiohttp.FormData()
    for name, value in fields.items():
        form.add_field(name, value)
    form.add_field("language", "en")
    resp = await gateway.post("/v1/audio/transcriptions", data=form, headers={"Authorization": f"Bearer {user.key}"})
    assert resp.status == 400 and (await resp.json())["error"]["param"] == param
    assert mock_upstream.requests == []


async def test_a_chat_model_is_refused_for_transcription(base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    with pytest.raises(openai.BadRequestError) as err:
        await sdk(base_url, user.key).audio.transcriptions.create(model="gpt-4o-mini", file=mp3(1_000))
    assert err.value.body["code"] == "wrong_endpoint"
