"""Charge arithmetic: exact Decimal sums, rounded up to a whole micro once.

Units. Every rate held here is in *micros* of the card's currency:
- per-token rates are micros per token, which is numerically the card's
  "USD per 1M tokens" figure (1 USD = 1,000,000 micros);
- per-unit rates (request, tool call, image, audio second, meter unit) are
  micros per unit, i.e. the card's "USD per unit" times 1,000,000.

No float ever enters: rates are Decimals read from the YAML source text, token
counts are ints, and a sum is evaluated in a wide Decimal context that traps
inexact results, so a charge is either exact or an error, never quietly off.
"""

from __future__ import annotations

import decimal
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from functools import cached_property
from typing import TYPE_CHECKING

from pricing.values import value

if TYPE_CHECKING:  # pragma: no cover
    from pricing.cards import MeterPrice, ModelPrice

MICROS_PER_UNIT = 1_000_000
ZERO = Decimal(0)

# Wide enough for any realistic sum (10^12 tokens at prices with 20 decimals),
# and Inexact is a trap: a product or sum that would lose a digit raises.
_EXACT = decimal.Context(prec=80, rounding=decimal.ROUND_CEILING, traps=[decimal.Inexact, decimal.InvalidOperation])


@dataclass(frozen=True)
class Rates:
    """One side of a model's prices (what the user pays, or what it costs us), in micros."""

    input: Decimal
    output: Decimal = ZERO
    cached_input: Decimal | None = None  # None: same as input
    reasoning: Decimal | None = None  # None: same as output
    per_request: Decimal = ZERO
    tools: Mapping[str, Decimal] = field(default_factory=dict)  # micros per call
    per_image: Decimal = ZERO
    per_audio_second: Decimal = ZERO
    per_audio_minute: Decimal = ZERO  # charged per second of audio, as rate x seconds / 60

    @cached_property
    def scaled(self) -> ScaledRates:
        """The same rates as integers over one power of ten, for fast exact sums."""
        return ScaledRates.of(self)

    @property
    def effective_cached_input(self) -> Decimal:
        return self.input if self.cached_input is None else self.cached_input

    @property
    def effective_reasoning(self) -> Decimal:
        return self.output if self.reasoning is None else self.reasoning


@value
class Usage:
    """What one call consumed, in OpenAI's terms.

    `cached_tokens` is a subset of `prompt_tokens` and `reasoning_tokens` a
    subset of `completion_tokens`, as in OpenAI's usage object. Inconsistent
    reports are clamped (a subset never exceeds its total, counts never go
    below zero) so a buggy upstream cannot produce a negative charge.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    tool_calls: Mapping[str, int] = field(default_factory=dict)
    images: int = 0
    audio_seconds: int = 0
    requests: int = 1


@value
class Charge:
    """A priced call: both sides in whole micros, each rounded up once."""

    price_micros: int  # what the end user pays
    cost_micros: int  # provider cost (COGS)

    @property
    def margin_micros(self) -> int:
        return self.price_micros - self.cost_micros


def _count(value: int) -> int:
    if type(value) is int:  # nearly always (a bool's type is bool): the checks below need not run
        return value if value > 0 else 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"usage counts must be integers, got {value!r}")
    return max(value, 0)


def exact_total(rates: Rates, usage: Usage) -> Fraction:
    """The unrounded amount, in micros, that `usage` costs at `rates` (exact: a per-minute
    audio price charged by the second need not be a finite decimal)."""
    prompt = _count(usage.prompt_tokens)
    cached = min(_count(usage.cached_tokens), prompt)
    completion = _count(usage.completion_tokens)
    reasoning = min(_count(usage.reasoning_tokens), completion)
    ctx = _EXACT
    total = ZERO
    parts = [
        (rates.input, prompt - cached),
        (rates.effective_cached_input, cached),
        (rates.output, completion - reasoning),
        (rates.effective_reasoning, reasoning),
        (rates.per_request, _count(usage.requests)),
        (rates.per_image, _count(usage.images)),
        (rates.per_audio_second, _count(usage.audio_seconds)),
    ]
    for tool, calls in usage.tool_calls.items():
        # A tool the card does not price is free: the model's token prices cover it.
        parts.append((rates.tools.get(tool, ZERO), _count(calls)))
    for rate, quantity in parts:
        if quantity:
            total = ctx.add(total, ctx.multiply(rate, Decimal(quantity)))
    return Fraction(total) + Fraction(rates.per_audio_minute) * _count(usage.audio_seconds) / 60


def ceil_micros(amount: Decimal | Fraction) -> int:
    """Round an exact amount of micros up to a whole micro."""
    return math.ceil(Fraction(amount))


def ceil_div(amount: Decimal | Fraction, divisor: Decimal) -> int:
    """ceil(amount / divisor) exactly, for a positive divisor (both as exact fractions)."""
    if divisor <= 0:
        raise ValueError("divisor must be positive")
    return math.ceil(Fraction(amount) / Fraction(divisor))


@dataclass(frozen=True)
class ScaledRates:
    """`Rates` as integer numerators over a common denominator `scale` (60 times a power of ten).

    Summing integers is exact by construction and several times faster than a
    trapped Decimal context; the request path prices every call two or three
    times. `exact_total` stays the reference the tests compare against.
    """

    scale: int
    input: int
    cached_input: int
    output: int
    reasoning: int
    per_request: int
    per_image: int
    per_audio_second: int
    per_audio_minute: int  # over scale / 60: its quantity is seconds
    tools: Mapping[str, int]

    @classmethod
    def of(cls, rates: Rates) -> ScaledRates:
        named = {
            "input": rates.input, "cached_input": rates.effective_cached_input, "output": rates.output,
            "reasoning": rates.effective_reasoning, "per_request": rates.per_request, "per_image": rates.per_image,
            "per_audio_second": rates.per_audio_second,
        }
        every = [*named.values(), *rates.tools.values(), rates.per_audio_minute]
        places = max(0, max((-int(d.as_tuple().exponent) for d in every if d.is_finite()), default=0))

        def whole(d: Decimal) -> int:
            return int(d.scaleb(places, _EXACT))

        # Everything is counted in sixtieths, so per-minute audio charged by the second stays whole.
        return cls(
            scale=10**places * 60, **{k: whole(v) * 60 for k, v in named.items()},
            per_audio_minute=whole(rates.per_audio_minute), tools={k: whole(v) * 60 for k, v in rates.tools.items()},
        )

    def total(self, usage: Usage) -> int:
        """`exact_total(rates, usage)` times `scale`, exactly."""
        prompt = _count(usage.prompt_tokens)
        cached = min(_count(usage.cached_tokens), prompt)
        completion = _count(usage.completion_tokens)
        reasoning = min(_count(usage.reasoning_tokens), completion)
        total = (
            self.input * (prompt - cached) + self.cached_input * cached
            + self.output * (completion - reasoning) + self.reasoning * reasoning
            + self.per_request * _count(usage.requests) + self.per_image * _count(usage.images)
            + (self.per_audio_second + self.per_audio_minute) * _count(usage.audio_seconds)
        )
        for tool, calls in usage.tool_calls.items():
            total += self.tools.get(tool, 0) * _count(calls)
        return total


def _ceil_fraction(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def price_usage(model: ModelPrice, usage: Usage) -> Charge:
    """What `usage` of `model` costs the user and us, each rounded up once."""
    price_rates, cost_rates = model.price.scaled, model.cost.scaled
    price_total = price_rates.total(usage)
    price = _ceil_fraction(price_total, price_rates.scale)
    # cost = total / markup, with the markup p/q exact: ceil(total * q / (scale * p)).
    p, q = model.cost_divisor.as_integer_ratio()
    cost_total = price_total if cost_rates is price_rates else cost_rates.total(usage)  # a card without costs
    cost = _ceil_fraction(cost_total * q, cost_rates.scale * p)
    return Charge(price_micros=price, cost_micros=cost)


def price_meter(meter: MeterPrice, quantity: Decimal | int) -> Charge:
    """Charge for `quantity` units of a non-token meter (hours, pages, GB...)."""
    if isinstance(quantity, bool) or not isinstance(quantity, (int, Decimal)):
        raise TypeError(f"meter quantity must be an int or Decimal, got {type(quantity).__name__}")
    quantity = Decimal(quantity)
    if not quantity.is_finite() or quantity < 0:
        raise ValueError(f"meter quantity must be a finite, non-negative number, got {quantity}")
    price = ceil_micros(_EXACT.multiply(meter.price, quantity))
    cost = ceil_div(_EXACT.multiply(meter.cost, quantity), meter.cost_divisor)
    return Charge(price_micros=price, cost_micros=cost)


def format_micros(micros: int | Decimal, currency: str = "USD") -> str:
    """`1234` -> `0.001234 USD`; exact, for people."""
    amount = Decimal(micros).scaleb(-6)
    text = f"{amount:f}"
    if "." in text:
        whole, frac = text.split(".")
        text = f"{whole}.{frac.ljust(6, '0')}" if len(frac) <= 6 else f"{whole}.{frac.rstrip('0')}"
    else:
        text = f"{text}.000000"
    return f"{text} {currency}" if currency else text
