"""How a stream's output is counted: not chunk by chunk, but once, and only when the count is needed
(a close without the upstream's usage, a checkpoint, or the hold's edge, where each chunk is counted
exactly before it is relayed)."""

from __future__ import annotations

import pytest

from pricing import count_text_tokens
from proxy.calls import lease as lease_module
from tests.mock_upstream import reply_chunks
from tests.proxy.test_gateway_failures import CHAT, ledger_types, sdk


@pytest.fixture
def tokenizations(monkeypatch) -> list[str]:
    """Every text the lease tokenizes."""
    seen: list[str] = []

    def counting(text: str) -> int:
        seen.append(text)
        return count_text_tokens(text)

    monkeypatch.setattr(lease_module, "count_text_tokens", counting)
    return seen


async def the_charge(wallets, user_id: str = "u_1"):
    [charge] = [e for e in await wallets.ledger(user_id, limit=50) if e.type == "charge"]
    return charge


async def stream_all(base_url: str, key: str, **body) -> str:
    stream = await sdk(base_url, key).chat.completions.create(**{**CHAT, **body}, stream=True)
    return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])


async def test_a_stream_with_the_upstreams_usage_is_never_tokenized(base_url, make_end_user, mock_upstream, wallets,
                                                                     tokenizations):
    user = await make_end_user()
    mock_upstream.reply_words = 20  # ~40 tokens, well inside the 200 the hold covers
    await stream_all(base_url, user.key)
    assert tokenizations == []
    assert (await the_charge(wallets)).details["usage_source"] == "upstream"


async def test_a_stream_without_usage_is_charged_its_text_tokenized_once(base_url, make_end_user, mock_upstream,
                                                                         wallets, tokenizations):
    user = await make_end_user()
    mock_upstream.reply_words, mock_upstream.omit_usage = 20, True
    text = await stream_all(base_url, user.key)
    assert text == "".join(reply_chunks(20)) and tokenizations == [text]
    charge = await the_charge(wallets)
    assert charge.details["usage_source"] == "counted"
    assert charge.details["completion_tokens"] == count_text_tokens(text)


async def test_a_stream_past_its_hold_counts_at_the_edge_and_grows_the_hold(base_url, make_end_user, mock_upstream,
                                                                            wallets, tokenizations):
    user = await make_end_user()
    mock_upstream.reply_words, mock_upstream.omit_usage = 60, True  # the upstream ignores max_tokens
    text = await stream_all(base_url, user.key, max_tokens=10)
    assert "hold_extend" in await ledger_types(wallets, "u_1")
    charge = await the_charge(wallets)
    assert charge.details["completion_tokens"] == count_text_tokens(text)
    # Counted in a few pieces near the edge, not once per chunk of the 60.
    assert 1 < len(tokenizations) < 60 and "".join(tokenizations) == text
