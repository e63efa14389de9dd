"""Image generation (`POST /v1/images/generations`) through the official SDK: held for `n` images at the
card's price for the size and quality asked, charged for the images returned. The bundled card's dall-e-3:
1024x1024 standard 0.05 USD, hd 0.10 USD; 1792x1024 standard 0.10, hd 0.15."""

from __future__ import annotations

import asyncio

import openai
import pytest


def sdk(base_url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0)


async def settled_charge(wallets, user_id: str = "u_1"):
    for _ in range(200):
        if (await wallets.get(user_id)).held_micros == 0:
            return next(e for e in await wallets.ledger(user_id, limit=20) if e.type == "charge")
        await asyncio.sleep(0.02)
    raise AssertionError("the hold was never closed")


async def test_images_are_charged_per_image_at_the_size_and_quality_asked(base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    raw = await sdk(base_url, user.key).images.with_raw_response.generate(
        model="dall-e-3", prompt="a lighthouse at dusk", n=2, size="1792x1024", quality="hd")
    assert len(raw.parse().data) == 2
    charge = await settled_charge(wallets)
    assert -charge.amount_micros == 2 * 150_000 and charge.details["cost_micros"] == 2 * 120_000
    assert raw.headers["X-Usage-Cost"] == "0.300000"
    assert (await wallets.get("u_1")).balance_micros == 10_000_000 - 300_000
    assert mock_upstream.requests[-1].json["model"] == "dall-e-3"


async def test_the_hold_is_n_images_at_the_default_size_and_quality(base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    mock_upstream.first_byte_delay = 0.5
    call = asyncio.create_task(sdk(base_url, user.key).images.generate(model="dall-e-3", prompt="x", n=3))
    for _ in range(100):
        if mock_upstream.requests:
            break
        await asyncio.sleep(0.01)
    held = (await wallets.get("u_1")).held_micros
    await call
    assert held == 3 * 50_000  # 1024x1024 standard, the card's first size and its first quality
    assert -(await settled_charge(wallets)).amount_micros == 3 * 50_000


async def test_fewer_images_than_asked_pay_for_those_returned(base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    mock_upstream.images_returned = 1
    await sdk(base_url, user.key).images.generate(model="dall-e-3", prompt="x", n=4, quality="hd")
    assert -(await settled_charge(wallets)).amount_micros == 100_000


@pytest.mark.parametrize("extra, param", [({"size": "256x256"}, "size"), ({"quality": "ultra"}, "size"),
                                          ({"n": 11}, "n"), ({"stream": True}, "stream")])
async def test_an_unpriced_or_malformed_image_request_is_a_400_and_nothing_is_forwarded(
        gateway, make_end_user, mock_upstream, wallets, extra, param):
    user = await make_end_user()
    resp = await gateway.post("/v1/images/generations", json={"model": "dall-e-3", "prompt": "x", **extra},
                              headers={"Authorization": f"Bearer {user.key}"})
    assert resp.status == 400 and (await resp.json())["error"]["param"] == param
    assert mock_upstream.requests == []
    assert (await wallets.get("u_1")).balance_micros == 10_000_000


async def test_a_wallet_that_cannot_pay_for_the_images_is_a_402(base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user(funds=99_999)
    with pytest.raises(openai.APIStatusError) as err:
        await sdk(base_url, user.key).images.generate(model="dall-e-3", prompt="x", n=2)
    assert err.value.status_code == 402
    assert mock_upstream.requests == []


async def test_an_upstream_error_costs_nothing(base_url, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    mock_upstream.fail_status = 500
    with pytest.raises(openai.APIStatusError):
        await sdk(base_url, user.key).images.generate(model="dall-e-3", prompt="x")
    assert (await wallets.get("u_1")).balance_micros == 10_000_000


async def test_a_chat_model_is_refused_on_the_images_endpoint(gateway, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    resp = await gateway.post("/v1/images/generations", json={"model": "gpt-4o-mini", "prompt": "x"},
                              headers={"Authorization": f"Bearer {user.key}"})
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "wrong_endpoint"
