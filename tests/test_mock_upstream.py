"""Tests of the mock OpenAI provider itself, through the official SDK."""

from __future__ import annotations

import aiohttp
import openai
import orjson
import pytest
from openai import AsyncOpenAI

from tests.mock_upstream import (
    MockUpstream,
    count_chat_prompt_tokens,
    count_tokens,
    make_usage,
    running_mock_upstream,
)

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello to the metering proxy."},
]


@pytest.fixture
async def mock():
    async with running_mock_upstream() as m:
        yield m


@pytest.fixture
async def client(mock: MockUpstream):
    c = AsyncOpenAI(base_url=mock.base_url, api_key="x", max_retries=0, timeout=5)
    yield c
    await c.close()


def expected_reply(n: int) -> str:
    return " ".join(f"word{i}" for i in range(n))


async def test_non_streamed_chat_returns_honest_usage(mock, client):
    r = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert r.object == "chat.completion"
    assert r.id.startswith("chatcmpl-")
    assert r.model == "gpt-4o-mini"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected_reply(20)
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == count_chat_prompt_tokens(MESSAGES)
    assert r.usage.completion_tokens == count_tokens(expected_reply(20))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    assert r.usage.completion_tokens_details.reasoning_tokens == 0


async def test_prompt_tokens_follow_cookbook_formula():
    # Cookbook reference value for this exact example list (gpt-3.5-turbo-0613 / gpt-4): 129.
    example = [
        {"role": "system", "content": "You are a helpful, pattern-following assistant that translates corporate jargon into plain English."},
        {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
        {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
        {"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage."},
        {"role": "system", "name": "example_assistant", "content": "Let's talk later when we're less busy about how to do better."},
        {"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the client deliverable."},
    ]
    assert count_chat_prompt_tokens(example) == 129


async def test_request_is_recorded(mock, client):
    await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, extra_headers={"X-Trace": "t1"})
    [rec] = mock.requests
    assert rec.path == "/v1/chat/completions"
    assert rec.headers["authorization"] == "Bearer x"
    assert rec.headers["x-trace"] == "t1"
    assert rec.json["model"] == "gpt-4o"
    assert rec.json["messages"] == MESSAGES


async def test_stream_with_include_usage_ends_with_usage_chunk(mock, client):
    mock.reply_words = 5
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected_reply(5)
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == []
    assert last.usage.prompt_tokens == count_chat_prompt_tokens(MESSAGES)
    assert last.usage.completion_tokens == count_tokens(expected_reply(5))
    assert mock.streams_started == mock.streams_completed == 1


async def test_stream_without_include_usage_has_no_usage(mock, client):
    mock.reply_words = 5
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    chunks = [c async for c in stream]
    assert len(chunks) == 6  # 5 words + finish chunk
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)


async def test_stream_raw_wire_format(mock):
    mock.reply_words = 2
    body = {"model": "m", "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}
    async with aiohttp.ClientSession() as s:
        async with s.post(mock.base_url + "/chat/completions", json=body) as r:
            assert r.content_type == "text/event-stream"
            raw = await r.read()
    events = raw.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    assert all(e.startswith(b"data: {") for e in events[:-2])
    assert len(events[:-2]) == 4  # 2 words, finish, usage
    assert all(b'"usage":null' in e for e in events[:-3])


async def test_a_request_can_ask_for_its_own_reply_length(mock, client):
    mock.reply_words = 5
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True},
        extra_body={"mock_reply_words": 12},
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected_reply(12)
    assert chunks[-1].usage.completion_tokens == count_tokens(expected_reply(12))
    whole = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                                 extra_body={"mock_reply_words": 3})
    assert whole.choices[0].message.content == expected_reply(3)
    default = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert default.choices[0].message.content == expected_reply(5)


async def test_obfuscate_pads_every_delta_chunk_with_a_new_random_string(mock):
    mock.reply_words, mock.obfuscate = 6, True
    body = {"model": "m", "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}
    async with aiohttp.ClientSession() as s:
        async with s.post(mock.base_url + "/chat/completions", json=body) as r:
            raw = await r.read()
    chunks = [orjson.loads(e[6:]) for e in raw.split(b"\n\n")[:-2]]
    paddings = [c["obfuscation"] for c in chunks if c["choices"]]
    assert len(paddings) == 7 and all(p.isalnum() for p in paddings)  # 6 words and the finish chunk
    assert len(set(paddings)) > 1
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == expected_reply(6)


async def test_cut_after_chunks_ends_stream_early(mock, client):
    mock.cut_after_chunks = 3
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    got = []
    with pytest.raises(openai.APIError):  # this SDK wraps the transport error as APIConnectionError
        async for c in stream:
            got.append(c)
    assert [c.choices[0].delta.content for c in got] == ["word0", " word1", " word2"]
    assert mock.streams_completed == 0


async def test_fail_status_500_raises_internal_server_error(mock, client):
    mock.fail_status = 500
    with pytest.raises(openai.InternalServerError) as ei:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert ei.value.status_code == 500
    assert ei.value.body["type"] == "server_error"


async def test_fail_status_429_raises_rate_limit_with_retry_after(mock, client):
    mock.fail_status = 429
    with pytest.raises(openai.RateLimitError) as ei:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    assert ei.value.response.headers["retry-after"] == "1"
    assert ei.value.code == "rate_limit_exceeded"


async def test_fail_count_fails_only_next_n_requests(mock, client):
    mock.fail_status, mock.fail_count = 503, 1
    with pytest.raises(openai.InternalServerError):
        await client.models.list()
    assert len((await client.models.list()).data) > 0


async def test_usage_override_is_reported(mock, client):
    mock.usage_override = make_usage(1000, 50, cached=600, reasoning=30)
    r = await client.chat.completions.create(model="o3-mini", messages=MESSAGES)
    assert r.usage.prompt_tokens == 1000
    assert r.usage.completion_tokens == 50
    assert r.usage.prompt_tokens_details.cached_tokens == 600
    assert r.usage.completion_tokens_details.reasoning_tokens == 30


async def test_omit_usage_suppresses_usage_chunk(mock, client):
    mock.omit_usage = True
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)


async def test_client_disconnect_is_detected(mock):
    mock.chunk_delay = 0.05
    body = {"model": "m", "messages": MESSAGES, "stream": True}
    async with aiohttp.ClientSession() as s:
        r = await s.post(mock.base_url + "/chat/completions", json=body)
        await r.content.readline()  # first event arrived
        r.close()  # drop the connection mid-stream
    assert await mock.wait_disconnected(timeout=2)
    assert mock.streams_completed == 0


async def test_wait_disconnected_times_out_when_nothing_disconnects(mock):
    assert await mock.wait_disconnected(timeout=0.05) is False


async def test_legacy_completions_stream(mock, client):
    mock.reply_words = 3
    stream = await client.completions.create(
        model="gpt-3.5-turbo-instruct", prompt="Say hi", stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected_reply(3)
    assert chunks[-1].usage.prompt_tokens == count_tokens("Say hi")


async def test_embeddings_float_and_base64(mock, client):
    r = await client.embeddings.create(model="text-embedding-3-small", input=["a b c", "d"])  # SDK asks base64
    assert [len(d.embedding) for d in r.data] == [8, 8]
    assert r.usage.prompt_tokens == r.usage.total_tokens == count_tokens("a b c") + count_tokens("d")
    r2 = await client.embeddings.create(model="text-embedding-3-small", input="x", encoding_format="float", dimensions=4)
    assert len(r2.data[0].embedding) == 4


async def test_fast_mode_reports_constant_usage(mock, client):
    mock.fast = True
    r = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == mock.fast_usage
