"""How a stream's output is counted: not chunk by chunk, but once, and only when the count is needed
(a close without the upstream's usage, a checkpoint, or the hold's edge, where each chunk is counted
exactly before it is relayed)."""

from __future__ import annotations

import pytest

from pricing import count_text_tokens
from proxy.calls import lease as lease_module
from proxy.calls import stream as stream_module
from proxy.calls.sse import SSEDecoder
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


@pytest.fixture
def chunk_parses(monkeypatch) -> list[bytes]:
    """The data of every chat stream event read with a JSON parse."""
    seen: list[bytes] = []
    parse = stream_module.read_event

    def counting(data: bytes, tools=None):
        seen.append(data)
        return parse(data, tools)

    monkeypatch.setattr(stream_module, "read_event", counting)
    return seen


@pytest.mark.parametrize("obfuscate", [False, True], ids=["plain", "padded"])
@pytest.mark.parametrize("chunk_delay", [0.0, 0.003], ids=["reads-of-many-chunks", "a-chunk-a-read"])
async def test_a_streams_plain_chunks_are_read_by_their_shape_not_parsed(base_url, make_end_user, mock_upstream,
                                                                         wallets, chunk_parses, monkeypatch,
                                                                         chunk_delay, obfuscate):
    decoded: list[bytes] = []
    feed = SSEDecoder.feed
    monkeypatch.setattr(SSEDecoder, "feed", lambda self, piece: decoded.append(piece) or feed(self, piece))
    user = await make_end_user()
    mock_upstream.reply_words, mock_upstream.omit_usage, mock_upstream.chunk_delay = 20, True, chunk_delay
    mock_upstream.obfuscate = obfuscate  # random padding in every chunk, as OpenAI sends by default
    text = await stream_all(base_url, user.key)
    assert text == "".join(reply_chunks(20))
    if chunk_delay:  # a read that is one chunk of the shape does not reach the decoder
        assert b"".join(decoded).count(b"data: ") < 6
    # Parsed: the role chunk and the first plain one (each teaching its shape, with one probe
    # parse each) and the finish chunk; the other 18 plain chunks are read by the shape.
    assert len(chunk_parses) == 5
    assert (await the_charge(wallets)).details["completion_tokens"] == count_text_tokens(text)


async def test_chunks_a_shape_cannot_read_are_parsed_and_counted_the_same(base_url, make_end_user, mock_upstream,
                                                                          wallets, chunk_parses, tokenizations):
    user = await make_end_user()
    pieces = ("Hi", " there", ', "quoted"', " é 漢字 🙂", "\n\nnext", " back\\slash", "\t", " done")
    mock_upstream.reply_pieces, mock_upstream.omit_usage = pieces, True
    text = await stream_all(base_url, user.key)
    assert text == "".join(pieces) and tokenizations == [text]
    # Parsed: the role chunk and " there" (each teaching a shape, with one probe parse each), the
    # four with an escape, and the finish chunk; " é 漢字 🙂" and " done" are read by the shape.
    assert len(chunk_parses) == 9
    charge = await the_charge(wallets)
    assert charge.details["usage_source"] == "counted"
    assert charge.details["completion_tokens"] == count_text_tokens(text)


async def test_a_stream_whose_chunks_teach_no_shape_stops_trying_after_a_few(base_url, make_end_user, mock_upstream,
                                                                             wallets, monkeypatch):
    tries: list[bytes] = []
    monkeypatch.setattr(stream_module.ChunkShape, "learn", lambda data, text, read: tries.append(data))  # never fits
    user = await make_end_user()
    mock_upstream.reply_words, mock_upstream.omit_usage = 20, True
    text = await stream_all(base_url, user.key)
    assert text == "".join(reply_chunks(20))
    assert len(tries) == stream_module.SHAPE_LEARNINGS
    assert (await the_charge(wallets)).details["completion_tokens"] == count_text_tokens(text)
