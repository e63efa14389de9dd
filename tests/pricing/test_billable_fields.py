"""Billable request fields against the card: service-tier multipliers, built-in tools, and the
per-model warnings of `ratecard check` (pure: no proxy)."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest

from pricing import RateCardError, Usage, load_rate_card, price_usage
from pricing.billable import Unpriced, billables, unpriced_fields
from pricing.cli import main as ratecard_main
from pricing.money import exact_total

from .helpers import write

TIERED = """
id: c
version: 1
effective_from: 2026-01-01
models:
  m:
    upstream: openai
    max_output_tokens: 100
    price: {input: 0.15, output: 0.60, per_request: 0.0001, tools: {web_search: 0.025}}
    cost: {markup: 1.25}
    service_tiers: {default: 1, flex: 0.5, priority: 2, odd: 1.0625}
  plain:
    upstream: openai
    max_output_tokens: 100
    price: {input: 1, output: 2}
    cost: {input: 0.8, output: 1.6}
"""

USAGE = Usage(prompt_tokens=1000, completion_tokens=500, requests=0)


@pytest.fixture
def card(tmp_path: Path):
    return load_rate_card(write(tmp_path, "c.yaml", TIERED))


def test_service_tiers_are_read_as_exact_decimals(card) -> None:
    assert card.models["m"].service_tiers == {"default": 1, "flex": Decimal("0.5"), "priority": 2, "odd": Decimal("1.0625")}
    assert all(isinstance(v, Decimal) for v in card.models["m"].service_tiers.values())


@pytest.mark.parametrize("bad, message", [("0", "greater than 0"), ("-1", "greater than 0"), ("x", "not a number")])
def test_a_bad_multiplier_is_reported_at_its_line(tmp_path: Path, bad: str, message: str) -> None:
    path = write(tmp_path, "c.yaml", TIERED.replace("priority: 2", f"priority: {bad}"))
    with pytest.raises(RateCardError) as caught:
        load_rate_card(path)
    [issue] = caught.value.issues
    assert (issue.line, issue.field) == (10, "models.m.service_tiers.priority")
    assert message in issue.message


def test_priority_doubles_the_token_price_and_its_cost(card) -> None:
    # default: 1000 x 0.15 + 500 x 0.60 = 450 micros, cost 450 / 1.25 = 360
    assert price_usage(card.models["m"], USAGE) == price_usage(card.models["m"].at_service_tier("default"), USAGE)
    charge = price_usage(card.models["m"].at_service_tier("priority"), USAGE)
    assert (charge.price_micros, charge.cost_micros) == (900, 720)


def test_flex_halves_explicit_costs_too(card) -> None:
    charge = price_usage(card.models["m"].at_service_tier("flex"), USAGE)
    assert (charge.price_micros, charge.cost_micros) == (225, 180)


def test_a_fractional_multiplier_stays_exact(card) -> None:
    tiered = card.models["m"].at_service_tier("odd")
    usage = Usage(prompt_tokens=7, completion_tokens=3, requests=0)
    # 7 x 0.159375 + 3 x 0.6375 = 3.028125 micros -> 4, equal to the Decimal reference sum
    assert exact_total(tiered.price, usage) == Fraction("3.028125")
    assert price_usage(tiered, usage).price_micros == 4


def test_a_tier_leaves_per_call_prices_alone(card) -> None:
    usage = Usage(tool_calls={"web_search": 2}, requests=1)
    # 2 x 25,000 + 100 micros, at any tier
    assert price_usage(card.models["m"].at_service_tier("priority"), usage).price_micros == 50_100


def test_the_default_tier_is_the_model_itself(card) -> None:
    # The common case reuses the card's model and its cached integer rates: nothing rebuilt per call.
    model = card.models["plain"]
    assert model.at_service_tier("default") is model
    assert card.models["m"].at_service_tier("priority") is card.models["m"].at_service_tier("priority")


def test_a_tier_the_card_does_not_list_raises_key_error(card) -> None:
    with pytest.raises(KeyError):
        card.models["plain"].at_service_tier("priority")


@pytest.mark.parametrize("asked", [None, "default", "auto"])
def test_absent_default_and_auto_are_the_cards_default(card, asked) -> None:
    body = {} if asked is None else {"service_tier": asked}
    billed = billables(card.models["plain"], body)
    assert (billed.service_tier, billed.model) == ("default", card.models["plain"])


def test_auto_takes_the_cards_auto_entry_when_it_has_one(tmp_path: Path) -> None:
    card = load_rate_card(write(tmp_path, "c.yaml", TIERED.replace("odd: 1.0625", "auto: 2")))
    billed = billables(card.models["m"], {"service_tier": "auto"})
    assert billed.service_tier == "auto"
    assert price_usage(billed.model, USAGE).price_micros == 900


def test_a_tier_the_card_does_not_price_is_refused(card) -> None:
    with pytest.raises(Unpriced) as caught:
        billables(card.models["plain"], {"service_tier": "priority"})
    assert (caught.value.code, caught.value.param) == ("unsupported_service_tier", "service_tier")


def test_a_service_tier_that_is_not_a_string_is_refused(card) -> None:
    with pytest.raises(Unpriced) as caught:
        billables(card.models["m"], {"service_tier": 2})
    assert caught.value.code == "invalid_request"


def test_web_search_holds_one_call_per_choice(card) -> None:
    billed = billables(card.models["m"], {"web_search_options": {}, "n": 3})
    assert dict(billed.held_tool_calls) == {"web_search": 3}
    assert billed.web_search_per_choice


def test_web_search_the_card_does_not_price_is_refused(card) -> None:
    with pytest.raises(Unpriced) as caught:
        billables(card.models["plain"], {"web_search_options": {"search_context_size": "low"}})
    assert (caught.value.code, caught.value.param) == ("unsupported_tool", "web_search_options")


def test_a_web_search_tool_of_any_version_is_the_cards_web_search(card) -> None:
    billed = billables(card.models["m"], {"tools": [{"type": "web_search_preview_2025_03_11"}]})
    assert dict(billed.held_tool_calls) == {"web_search": 1}
    assert not billed.web_search_per_choice  # a Responses-style tool: counted from the answer's items


def test_an_unpriced_built_in_tool_is_refused(card) -> None:
    with pytest.raises(Unpriced) as caught:
        billables(card.models["m"], {"tools": [{"type": "function", "function": {"name": "f"}}, {"type": "file_search"}]})
    assert (caught.value.code, caught.value.param) == ("unsupported_tool", "tools")
    assert "file_search" in caught.value.message


def test_function_tools_are_not_billed_per_call(card) -> None:
    billed = billables(card.models["plain"], {"tools": [{"type": "function", "function": {"name": "f"}}, {"type": "custom"}]})
    assert dict(billed.held_tool_calls) == {}


def test_unpriced_fields_name_tier_and_web_search_for_a_card_without_them(card) -> None:
    names = {f.name for f in unpriced_fields(card.models["plain"])}
    assert {"service_tier", "web_search_options / tools[type=web_search*]"} <= names
    names = {f.name for f in unpriced_fields(card.models["m"])}
    assert "service_tier" not in names and "web_search_options / tools[type=web_search*]" not in names


def test_check_warns_per_model_on_stderr_and_still_passes(tmp_path: Path, capsys) -> None:
    path = write(tmp_path, "c.yaml", TIERED)
    assert ratecard_main(["check", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"ok c@1: 2 models, USD, effective 2026-01-01 ({path})"]
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert ("warning: c@1 plain: not priced, requests using them are refused (400): service_tier, "
            "web_search_options / tools[type=web_search*], tools[type=file_search|code_interpreter|...]") in warnings
    assert not any(line.startswith("warning: c@1 m: not priced, requests") and "service_tier" in line for line in warnings)
