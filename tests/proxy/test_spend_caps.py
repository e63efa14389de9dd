"""Key spend caps are holds too: under any concurrency, a key's spend never passes its cap (issue 9)."""

from __future__ import annotations

import asyncio

from proxy.store import LimitStore
from tests.proxy.test_scopes import bearer, scoped_key

CAP = 1_000
STREAM = {
    "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 1, "stream": True,
}


async def test_concurrent_streams_that_outrun_their_holds_never_spend_past_the_keys_cap(
    gateway, make_end_user, mock_upstream, wallets, redis,
):
    # Each call holds a few micros for its one token; the upstream ignores
    # max_tokens and sends 40 words, so every stream asks to grow its hold.
    await make_end_user()
    key = await scoped_key(gateway, max_spend_micros=CAP)
    mock_upstream.reply_words = 40

    async def call() -> tuple[int, bytes]:
        resp = await gateway.post("/v1/chat/completions", json=STREAM, headers=bearer(key["key"]))
        return resp.status, await resp.read()

    results = await asyncio.gather(*(call() for _ in range(300)))
    statuses = [status for status, _ in results]
    assert statuses.count(200) > 0 and set(statuses) <= {200, 402}
    # Streams the cap could not grow were cut in-band, saying why.
    assert any(b"spend_limit_exceeded" in body for status, body in results if status == 200)

    charges = [e for e in await wallets.ledger("u_1", limit=1000) if e.type == "charge"]
    captured = -sum(e.amount_micros for e in charges)
    spend = await LimitStore(redis).spend("u_1", key["id"])
    assert captured == spend.spent_micros <= CAP
    assert all(e.details["shortfall_micros"] == 0 for e in charges)
    state = await wallets.get("u_1")
    assert (state.balance_micros, state.held_micros) == (10_000_000 - captured, 0)
