"""Charge arithmetic: exact Decimal sums of micros, rounded up once."""

from __future__ import annotations

import random
from decimal import Decimal

import pytest

from pricing import Charge, MeterPrice, Rates, Usage, format_micros, price_meter, price_usage
from pricing.cards import ModelPrice
from pricing.money import ceil_div, ceil_micros, exact_total

from .helpers import D, model

# (what it shows, rates, usage, expected price micros)
PRICE_TABLE = [
    ("input and output tokens", Rates(input=D("0.15"), output=D("0.60")), Usage(prompt_tokens=1000, completion_tokens=1000), 750),
    (
        "cached tokens at the cached price, the rest at input",
        Rates(input=D("2.5"), cached_input=D("1.25"), output=D("10")),
        Usage(prompt_tokens=1000, cached_tokens=400, completion_tokens=0),
        600 * D("2.5") + 400 * D("1.25"),
    ),
    (
        "cached price defaults to input price",
        Rates(input=D("2"), output=D("0")),
        Usage(prompt_tokens=10, cached_tokens=10),
        20,
    ),
    (
        "reasoning tokens at the reasoning price, the rest at output",
        Rates(input=D("0"), output=D("4"), reasoning=D("8")),
        Usage(completion_tokens=100, reasoning_tokens=30),
        70 * 4 + 30 * 8,
    ),
    (
        "reasoning price defaults to output price",
        Rates(input=D("0"), output=D("4")),
        Usage(completion_tokens=100, reasoning_tokens=30),
        400,
    ),
    ("per-request fee (micros per request)", Rates(input=D("0"), per_request=D("100")), Usage(requests=3), 300),
    (
        "tool calls priced per call, unpriced tools free",
        Rates(input=D("0"), tools={"web_search": D("10000")}),
        Usage(tool_calls={"web_search": 3, "code_interpreter": 5}),
        30000,
    ),
    ("images and audio seconds", Rates(input=D("0"), per_image=D("7"), per_audio_second=D("3")), Usage(images=2, audio_seconds=10), 44),
    # 0.01 USD per audio minute = 10,000 micros a minute, charged by the second
    ("audio priced per minute, 90 s", Rates(input=D("0"), per_audio_minute=D("10000")), Usage(audio_seconds=90), 15000),
    ("audio priced per minute, 1 s is 166.67 -> 167", Rates(input=D("0"), per_audio_minute=D("10000")), Usage(audio_seconds=1), 167),
    (
        "three components of 0.3 micros round up once to 1, not 3",
        Rates(input=D("0.3"), output=D("0.3"), per_request=D("0.3")),
        Usage(prompt_tokens=1, completion_tokens=1, requests=1),
        1,
    ),
    ("a fraction of a micro rounds up", Rates(input=D("0.15")), Usage(prompt_tokens=1), 1),
    ("an exact whole amount is not rounded up", Rates(input=D("0.25")), Usage(prompt_tokens=8), 2),
    (
        "a billion tokens stay exact",
        Rates(input=D("0.15"), output=D("0.60")),
        Usage(prompt_tokens=10**9, completion_tokens=10**9),
        750_000_000,
    ),
    (
        "a billion tokens at a price with many decimals",
        Rates(input=D("0.000000123456789"), output=D("0")),
        Usage(prompt_tokens=10**9 + 1),
        124,  # 123.456789123456789 micros -> 124
    ),
    ("0.1 + 0.2 is exactly 0.3 micros, which rounds up to 1", Rates(input=D("0.1"), output=D("0.2")), Usage(prompt_tokens=1, completion_tokens=1), 1),
    (
        "0.1 x 10 + 0.2 x 10 is exactly 3",
        Rates(input=D("0.1"), output=D("0.2")),
        Usage(prompt_tokens=10, completion_tokens=10),
        3,
    ),
    ("no usage, no fee: nothing to pay", Rates(input=D("5"), output=D("5")), Usage(requests=0), 0),
    (
        "cached tokens above prompt tokens are clamped",
        Rates(input=D("1"), cached_input=D("0")),
        Usage(prompt_tokens=5, cached_tokens=50),
        0,
    ),
    (
        "negative counts (a buggy upstream) are clamped to zero",
        Rates(input=D("1"), output=D("2"), per_request=D("3")),
        Usage(prompt_tokens=-5, completion_tokens=4, requests=-1),
        8,
    ),
]


@pytest.mark.parametrize(("rates", "usage", "expected"), [row[1:] for row in PRICE_TABLE], ids=[row[0] for row in PRICE_TABLE])
def test_price_usage_table(rates: Rates, usage: Usage, expected: int | Decimal) -> None:
    charge = price_usage(model(rates), usage)
    assert charge.price_micros == expected
    assert isinstance(charge.price_micros, int)


def test_cost_uses_the_cost_rates() -> None:
    m = model(Rates(input=D("3"), output=D("12")), Rates(input=D("2.5"), output=D("10")))
    assert price_usage(m, Usage(prompt_tokens=100, completion_tokens=10)) == Charge(price_micros=420, cost_micros=350)


def test_markup_cost_is_price_divided_by_markup_on_the_total() -> None:
    # price 0.1875*1000 + 0.75*1000 = 937.5 micros; cost 937.5/1.25 = 750 exactly
    m = model(Rates(input=D("0.1875"), output=D("0.75")), divisor="1.25")
    assert price_usage(m, Usage(prompt_tokens=1000, completion_tokens=1000)) == Charge(price_micros=938, cost_micros=750)


def test_markup_with_a_repeating_quotient_rounds_cost_up_once() -> None:
    # 10 micros / 3 = 3.33.. -> 4; and 9 / 3 = 3 exactly stays 3
    assert price_usage(model(Rates(input=D("1")), divisor="3"), Usage(prompt_tokens=10)).cost_micros == 4
    assert price_usage(model(Rates(input=D("1")), divisor="3"), Usage(prompt_tokens=9)).cost_micros == 3


def test_margin_is_price_minus_cost() -> None:
    assert Charge(price_micros=938, cost_micros=750).margin_micros == 188


@pytest.mark.parametrize("bad", [1.5, True, D("2")])
def test_price_usage_refuses_counts_that_are_not_integers(bad: object) -> None:
    with pytest.raises(TypeError):
        price_usage(model(Rates(input=D("1"))), Usage(prompt_tokens=bad))  # type: ignore[arg-type]


METER = MeterPrice(name="crawler_hour", unit="hour", price=D("500000"), cost=D("300000"))


@pytest.mark.parametrize(
    ("quantity", "price", "cost"),
    [(1, 500_000, 300_000), (3, 1_500_000, 900_000), (D("0.5"), 250_000, 150_000), (D("0.0000001"), 1, 1), (0, 0, 0)],
)
def test_price_meter_table(quantity: Decimal | int, price: int, cost: int) -> None:
    assert price_meter(METER, quantity) == Charge(price_micros=price, cost_micros=cost)


def test_price_meter_with_markup_cost() -> None:
    meter = MeterPrice(name="page", unit="page", price=D("1000"), cost=D("1000"), cost_divisor=D("1.25"))
    assert price_meter(meter, 3) == Charge(price_micros=3000, cost_micros=2400)


@pytest.mark.parametrize("bad", [0.5, -1, D("-0.1"), D("NaN"), True])
def test_price_meter_refuses_floats_negatives_and_nan(bad: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        price_meter(METER, bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(("micros", "text"), [(1234, "0.001234 USD"), (0, "0.000000 USD"), (2_500_000, "2.500000 USD"), (-5, "-0.000005 USD")])
def test_format_micros(micros: int, text: str) -> None:
    assert format_micros(micros) == text


def test_integer_fast_path_matches_the_decimal_reference_exactly():
    """price_usage sums scaled integers; exact_total (Decimal and Fraction) is the reference."""
    rng = random.Random(20261123)

    def price() -> Decimal:
        return Decimal(rng.randint(0, 10**7)).scaleb(-rng.randint(0, 9))

    for _ in range(2000):
        rates = [
            Rates(input=price(), output=price(), cached_input=rng.choice([None, price()]),
                  reasoning=rng.choice([None, price()]), per_request=price(), per_image=price(),
                  per_audio_second=price(), per_audio_minute=price(), tools={"web_search": price()})
            for _ in range(2)
        ]
        markup = Decimal(rng.randint(100, 400)).scaleb(-2)
        # A card without costs prices both sides from the one object (a path of its own).
        cost_rates = rng.choice([rates[0], rates[1]])
        model = ModelPrice(name="m", upstream="u", upstream_model="m", kind="chat", max_output_tokens=1,
                           price=rates[0], cost=cost_rates, cost_divisor=markup)
        prompt, completion = rng.randint(0, 10**9), rng.randint(0, 10**6)
        usage = Usage(prompt_tokens=prompt, completion_tokens=completion, cached_tokens=rng.randint(0, prompt),
                      reasoning_tokens=rng.randint(0, completion), tool_calls={"web_search": rng.randint(0, 5)},
                      images=rng.randint(0, 3), audio_seconds=rng.randint(0, 100), requests=rng.randint(0, 2))
        charge = price_usage(model, usage)
        assert charge.price_micros == ceil_micros(exact_total(rates[0], usage))
        assert charge.cost_micros == ceil_div(exact_total(cost_rates, usage), markup)
