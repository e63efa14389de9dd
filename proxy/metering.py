"""The money side of one call: size the hold, read usage, settle. Plain functions, explicit arguments."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from pricing import Charge, ModelPrice, RateCard, Usage, price_usage
from pricing.tokens import estimate_usage


@dataclass(frozen=True)
class Quote:
    """What a request may cost at most, before it runs: the amount to hold."""

    card: RateCard
    model: ModelPrice
    prompt_tokens: int
    max_output_tokens: int
    hold: Charge


def quote(card: RateCard, model: ModelPrice, body: Mapping[str, Any]) -> Quote:
    worst_case = estimate_usage(body, model)
    return Quote(card, model, worst_case.prompt_tokens, worst_case.completion_tokens, price_usage(model, worst_case))


def price_of(model: ModelPrice, usage: Usage) -> int:
    return price_usage(model, usage).price_micros


def output_price(model: ModelPrice, tokens: int) -> int:
    """What `tokens` more output tokens may cost at most (priced as reasoning when that is dearer)."""
    reasoning = tokens if model.price.effective_reasoning > model.price.output else 0
    return price_usage(model, Usage(completion_tokens=tokens, reasoning_tokens=reasoning, requests=0)).price_micros


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def usage_from_openai(usage: Mapping[str, Any]) -> Usage:
    """OpenAI's usage object (chat, completions, embeddings) as a `Usage`."""
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    return Usage(
        prompt_tokens=_int(usage.get("prompt_tokens")),
        completion_tokens=_int(usage.get("completion_tokens")),
        cached_tokens=_int(prompt_details.get("cached_tokens")) if isinstance(prompt_details, Mapping) else 0,
        reasoning_tokens=_int(completion_details.get("reasoning_tokens")) if isinstance(completion_details, Mapping) else 0,
    )


def usd_number(micros: int) -> float:
    """Micros as a JSON number of USD for `usage.cost` (display only; exact for 6 decimals)."""
    return float(Decimal(micros).scaleb(-6))


def charge_meta(
    *, request_id: str, key_id: str, quote: Quote, usage: Usage, charge: Charge, usage_source: str, outcome: str
) -> dict[str, Any]:
    """What a charge's ledger entry records, so margins can be reported per user, model and tier."""
    return {
        "request_id": request_id,
        "key_id": key_id,
        "model": quote.model.name,
        "upstream": quote.model.upstream,
        "upstream_model": quote.model.upstream_model,
        "ratecard": quote.card.ref,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "cached_tokens": usage.cached_tokens,
        "reasoning_tokens": usage.reasoning_tokens,
        "price_micros": charge.price_micros,
        "cost_micros": charge.cost_micros,
        "usage_source": usage_source,
        "outcome": outcome,
    }


def text_of_choices(data: Mapping[str, Any]) -> str:
    """The output text of a whole (non-streamed) answer: what is counted when it reports no usage."""
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
    return "".join(parts)
