"""The money side of one call: size the hold, read usage, settle. Plain functions, explicit arguments.

A quote checks the request's billable fields against the card first
(`pricing.billable`: service tier, built-in tools), so nothing billable goes
upstream unpriced; the quote's model carries the tier's prices, and every
later price of the call (hold, extensions, checkpoints, settlement) reads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from pricing import Charge, ModelPrice, RateCard, Usage, price_usage
from pricing.billable import OUTPUT_ITEM_TOOLS, WEB_SEARCH, Billables, Unpriced, billables
from pricing.tokens import estimate_usage
from pricing.values import value
from proxy.errors import ApiError


@value
class Quote:
    """What a request may cost at most, before it runs: the amount to hold."""

    card: RateCard
    model: ModelPrice
    prompt_tokens: int
    max_output_tokens: int
    hold: Charge
    service_tier: str = "default"  # the card's tier the call is priced at (`model` carries its prices)
    billables: Billables | None = None
    worst_case: Usage | None = None  # what `hold` prices

    def with_output_bound(self, max_output_tokens: int) -> Quote:
        """This quote with its output lowered to `max_output_tokens` (a clamped call)."""
        assert self.worst_case is not None
        usage = replace(self.worst_case, completion_tokens=max_output_tokens,
                        reasoning_tokens=max_output_tokens if self.worst_case.reasoning_tokens else 0)
        return replace(self, max_output_tokens=max_output_tokens, hold=price_usage(self.model, usage), worst_case=usage)


def quote(card: RateCard, model: ModelPrice, body: Mapping[str, Any]) -> Quote:
    """The worst case of `body` on `model`; a 400 for a billable field the card does not price.

    `model` in the quote is the model at the request's service tier."""
    try:
        billed = billables(model, body)
    except Unpriced as exc:
        raise ApiError(400, exc.message, code=exc.code, param=exc.param) from None
    priced = billed.model
    if priced.kind == "image":
        priced = image_priced(priced, body)
    worst_case = estimate_usage(body, priced)
    if priced.kind == "image":
        worst_case = replace(worst_case, images=images_asked(body))
    elif priced.kind == "speech":
        # Speech is billed per character of its input: a speech model's `input` price is USD per 1M characters.
        worst_case = Usage(prompt_tokens=len(body["input"]) if isinstance(body.get("input"), str) else 0)
    if billed.held_tool_calls:
        worst_case = replace(worst_case, tool_calls=billed.held_tool_calls)
    return Quote(card, priced, worst_case.prompt_tokens, worst_case.completion_tokens, price_usage(priced, worst_case),
                 billed.service_tier, billed, worst_case)


MAX_IMAGES = 10  # OpenAI's most images per request


def images_asked(body: Mapping[str, Any]) -> int:
    n = body.get("n")
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else 1


def image_priced(model: ModelPrice, body: Mapping[str, Any]) -> ModelPrice:
    """`model` at the request's image size and quality; a 400 for ones the card does not price."""
    size, quality = body.get("size"), body.get("quality")
    if size is not None and not isinstance(size, str) or quality is not None and not isinstance(quality, str):
        raise ApiError(400, "`size` and `quality` must be strings", code="invalid_request", param="size")
    if images_asked(body) > MAX_IMAGES:
        raise ApiError(400, f"`n` must be at most {MAX_IMAGES}", code="invalid_request", param="n")
    try:
        return model.for_image(size, quality)
    except KeyError:
        offered = ", ".join(f"{s} {q}" for s, q in model.image_prices)
        raise ApiError(400, f"`{model.name}` is not priced at size {size or 'default'} and quality {quality or 'default'}"
                            f" (priced: {offered})", code="unsupported_image_option", param="size") from None


def transcription_quote(card: RateCard, model: ModelPrice, size_bytes: int, filename: str) -> Quote:
    """An upload's worst case: its size over the least bytes per second of its format (a 400 for a format
    the card does not take), in whole seconds, at the model's audio prices."""
    extension = filename.rsplit(".", 1)[-1].lower() if "." in filename else ""
    rate = model.audio_min_bytes_per_second.get(extension)
    if rate is None:
        taken = ", ".join(sorted(model.audio_min_bytes_per_second))
        raise ApiError(400, f"`{model.name}` does not take .{extension or '?'} files (it takes {taken})",
                       code="unsupported_audio_format", param="file")
    worst_case = Usage(audio_seconds=max(1, -(-size_bytes // rate)))
    return Quote(card, model, 0, 0, price_usage(model, worst_case), worst_case=worst_case)


def affordable_output(quote: Quote, budget_micros: int, choices: int) -> int:
    """The most output tokens per choice whose worst case fits `budget_micros` (0 when none does)."""
    low, high = 0, quote.max_output_tokens // max(choices, 1)
    if quote.with_output_bound(0).hold.price_micros > budget_micros:
        return 0
    while low < high:  # the largest n with price(n * choices) <= budget
        mid = (low + high + 1) // 2
        if quote.with_output_bound(mid * choices).hold.price_micros <= budget_micros:
            low = mid
        else:
            high = mid - 1
    return low


def price_of(model: ModelPrice, usage: Usage) -> int:
    return price_usage(model, usage).price_micros


def output_price(model: ModelPrice, tokens: int) -> int:
    """What `tokens` more output tokens may cost at most (priced as reasoning when that is dearer)."""
    reasoning = tokens if model.price.effective_reasoning > model.price.output else 0
    return price_usage(model, Usage(completion_tokens=tokens, reasoning_tokens=reasoning, requests=0)).price_micros


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def usage_from_openai(usage: Mapping[str, Any]) -> Usage:
    """OpenAI's usage object as a `Usage`: chat, completions and embeddings name it
    `prompt_tokens`/`completion_tokens`, the Responses API `input_tokens`/`output_tokens`."""
    if "input_tokens" in usage and "prompt_tokens" not in usage:
        prompt_details = usage.get("input_tokens_details") or {}
        completion_details = usage.get("output_tokens_details") or {}
        prompt, completion = usage.get("input_tokens"), usage.get("output_tokens")
    else:
        prompt_details = usage.get("prompt_tokens_details") or {}
        completion_details = usage.get("completion_tokens_details") or {}
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return Usage(
        prompt_tokens=_int(prompt),
        completion_tokens=_int(completion),
        cached_tokens=_int(prompt_details.get("cached_tokens")) if isinstance(prompt_details, Mapping) else 0,
        reasoning_tokens=_int(completion_details.get("reasoning_tokens")) if isinstance(completion_details, Mapping) else 0,
    )


def _add_call(calls: dict[str, int], item: Any) -> None:
    kind = item.get("type") if isinstance(item, Mapping) else None
    tool = OUTPUT_ITEM_TOOLS.get(kind) if isinstance(kind, str) else None
    if tool is not None:
        calls[tool] = calls.get(tool, 0) + 1


def tool_calls_of_answer(quote: Quote, data: Mapping[str, Any]) -> dict[str, int]:
    """Built-in tool calls a whole answer shows: one web search per choice when chat's
    `web_search_options` was set, and each tool-call item of a Responses-style `output`."""
    calls: dict[str, int] = {}
    if quote.billables is not None and quote.billables.web_search_per_choice:
        choices = data.get("choices")
        calls[WEB_SEARCH] = sum(1 for c in choices if isinstance(c, Mapping)) if isinstance(choices, list) else 0
    output = data.get("output")
    for item in output if isinstance(output, list) else ():
        _add_call(calls, item)
    return {tool: n for tool, n in calls.items() if n}


class ToolCallCounter:
    """Built-in tool calls seen in a stream's events: the distinct choices of a chat
    stream with `web_search_options`, and `response.output_item.done` tool-call items."""

    def __init__(self, web_search_per_choice: bool) -> None:
        self.web_search_per_choice = web_search_per_choice
        self._choices: set[Any] = set()
        self._calls: dict[str, int] = {}

    @classmethod
    def for_quote(cls, quote: Quote) -> ToolCallCounter | None:
        """None when the request enables no built-in tool (nothing to count, nothing to slow down)."""
        billed = quote.billables
        if billed is None or not billed.tools:
            return None
        return cls(billed.web_search_per_choice)

    def see(self, event: Mapping[str, Any]) -> None:
        if self.web_search_per_choice:
            for choice in event.get("choices") or ():
                if isinstance(choice, Mapping):
                    self._choices.add(choice.get("index", 0))
        if event.get("type") == "response.output_item.done":
            _add_call(self._calls, event.get("item"))

    def calls(self) -> dict[str, int]:
        calls = dict(self._calls)
        if self._choices:
            calls[WEB_SEARCH] = calls.get(WEB_SEARCH, 0) + len(self._choices)
        return calls


def with_tool_calls(usage: Usage, calls: Mapping[str, int]) -> Usage:
    return replace(usage, tool_calls={**usage.tool_calls, **calls}) if calls else usage


def usd_number(micros: int) -> float:
    """Micros as a JSON number of USD for `usage.cost` (display only; exact for 6 decimals)."""
    # An int's true division is correctly rounded, as float(Decimal) is: the same float, 20x cheaper.
    return micros / 1_000_000


def charge_meta(
    *, request_id: str, key_id: str, quote: Quote, usage: Usage, charge: Charge, usage_source: str, outcome: str,
    tier: str | None = None,
) -> dict[str, Any]:
    """What a charge's ledger entry records, so margins can be reported per user, model and tier."""
    return {
        "request_id": request_id,
        "key_id": key_id,
        **({"tier": tier} if tier else {}),  # the end user's tier when the call ran (reports by tier)
        "model": quote.model.name,
        "upstream": quote.model.upstream,
        "upstream_model": quote.model.upstream_model,
        "ratecard": quote.card.ref,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "cached_tokens": usage.cached_tokens,
        "reasoning_tokens": usage.reasoning_tokens,
        "service_tier": quote.service_tier,
        **({"tool_calls": dict(usage.tool_calls)} if usage.tool_calls else {}),
        "price_micros": charge.price_micros,
        "cost_micros": charge.cost_micros,
        "usage_source": usage_source,
        "outcome": outcome,
    }


def text_of_choices(data: Mapping[str, Any]) -> str:
    """The output text of a whole (non-streamed) answer, its choices or its Responses `output`
    items: what is counted when it reports no usage."""
    parts = []
    for choice in data.get("choices") or ():
        if not isinstance(choice, Mapping):
            continue
        message = choice.get("message")
        if isinstance(message, Mapping):
            if isinstance(message.get("content"), str):
                parts.append(message["content"])
            for tc in message.get("tool_calls") or ():
                if isinstance(tc, Mapping) and isinstance(tc.get("function"), Mapping):
                    parts.append(str(tc["function"].get("arguments") or ""))
        elif isinstance(choice.get("text"), str):
            parts.append(choice["text"])
    output = data.get("output")  # the Responses API's output items
    for item in output if isinstance(output, list) else ():
        if not isinstance(item, Mapping):
            continue
        kind = item.get("type")
        if kind in ("message", "reasoning"):
            for part in [*(item.get("content") or ()), *(item.get("summary") or ())]:
                if isinstance(part, Mapping):
                    parts.extend(part[k] for k in ("text", "refusal") if isinstance(part.get(k), str))
        elif kind == "function_call" and isinstance(item.get("arguments"), str):
            parts.append(item["arguments"])
    return "".join(parts)
