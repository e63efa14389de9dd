"""Every rate card problem is reported with its file, line and field, all at once."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from pricing import RateCardError, Usage, load_rate_card, load_rate_cards, price_usage

from .helpers import minimal_card, write

REPO = Path(__file__).resolve().parents[2]


def issues_of(directory: Path, upstreams: frozenset[str] | None = frozenset({"openai"})) -> list[str]:
    with pytest.raises(RateCardError) as caught:
        load_rate_cards(directory, upstreams=upstreams)
    return [str(issue) for issue in caught.value.issues]


def card(tmp_path: Path, body: str, name: str = "card.yaml") -> Path:
    header = "id: c\nversion: 1\neffective_from: 2026-01-01\n"
    return write(tmp_path, name, header + body.lstrip("\n"))


MODEL = """
models:
  m:
    upstream: openai
    max_output_tokens: 100
    price: {input: 1, output: 2}
    cost: {markup: 1.25}
"""


def test_bundled_example_cards_load() -> None:
    cards = load_rate_cards(REPO / "config" / "ratecards", upstreams={"openai"})
    default = cards.card_for("default")
    for name, kind in [("gpt-4o-mini", "chat"), ("gpt-4o", "chat"), ("gpt-3.5-turbo-instruct", "completion"), ("text-embedding-3-small", "embedding")]:
        assert default.models[name].kind == kind
        assert default.models[name].upstream == "openai"
    assert cards.card_for("pro").id == "pro"


def test_prices_are_exact_decimals_from_the_yaml_text(tmp_path: Path) -> None:
    card(tmp_path, MODEL.replace("{input: 1, output: 2}", "{input: 0.1, output: 0.2, cached_input: 0.3, per_request: 0.1}"))
    m = load_rate_cards(tmp_path).card_for("c").model("m")
    assert m is not None
    assert m.price.input == Decimal("0.1") and m.price.output == Decimal("0.2")
    assert m.price.input + m.price.output == m.price.cached_input  # 0.1 + 0.2 == 0.3, exactly
    assert m.price.per_request == Decimal("100000")  # USD per request -> micros


def test_unknown_field(tmp_path: Path) -> None:
    path = card(tmp_path, "colour: red\n" + MODEL)
    assert issues_of(tmp_path) == [f"{path}:4: colour: unknown field"]


def test_unknown_field_inside_a_price(tmp_path: Path) -> None:
    path = card(tmp_path, MODEL.replace("{input: 1, output: 2}", "{input: 1, output: 2, outptu: 3}"))
    assert issues_of(tmp_path) == [f"{path}:8: models.m.price.outptu: unknown field"]


def test_negative_price(tmp_path: Path) -> None:
    path = card(tmp_path, MODEL.replace("{input: 1, output: 2}", "{input: -0.5, output: 2}"))
    assert issues_of(tmp_path) == [f"{path}:8: models.m.price.input: must not be negative (got -0.5)"]


def test_negative_meter_cost(tmp_path: Path) -> None:
    path = card(tmp_path, MODEL + "meters:\n  hour:\n    unit: hour\n    price: 1\n    cost: -1\n")
    assert issues_of(tmp_path) == [f"{path}:14: meters.hour.cost: must not be negative (got -1)"]


def test_missing_upstream(tmp_path: Path) -> None:
    path = card(tmp_path, MODEL.replace("    upstream: openai\n", ""))
    assert issues_of(tmp_path) == [f"{path}:5: models.m.upstream: missing required field"]


def test_unknown_upstream(tmp_path: Path) -> None:
    path = card(tmp_path, MODEL.replace("upstream: openai", "upstream: azure"))
    assert issues_of(tmp_path) == [f"{path}:6: models.m.upstream: unknown upstream 'azure' (known: openai)"]


def test_upstreams_not_checked_when_not_given(tmp_path: Path) -> None:
    card(tmp_path, MODEL.replace("upstream: openai", "upstream: azure"))
    assert load_rate_cards(tmp_path).card_for("c").models["m"].upstream == "azure"


def test_duplicate_model_key_is_invalid_yaml(tmp_path: Path) -> None:
    path = card(tmp_path, MODEL + MODEL.replace("models:\n", ""))
    [issue] = issues_of(tmp_path)
    assert issue.startswith(f"{path}:11: -: invalid YAML") and "duplicate key" in issue


def test_duplicate_alias_within_a_model(tmp_path: Path) -> None:
    path = card(tmp_path, MODEL.replace("    max_output_tokens", "    aliases: [a, b, a]\n    max_output_tokens"))
    assert issues_of(tmp_path) == [f"{path}:7: models.m.aliases.2: duplicate name 'a': already an alias of 'm'"]


def test_alias_colliding_with_a_model_name(tmp_path: Path) -> None:
    second = MODEL.replace("models:\n", "").replace("  m:", "  n:").replace("    max_output_tokens", "    aliases:\n      - m\n    max_output_tokens")
    path = card(tmp_path, MODEL + second)
    assert issues_of(tmp_path) == [f"{path}:14: models.n.aliases.0: duplicate name 'm': already model 'm'"]


def test_alias_shared_by_two_models(tmp_path: Path) -> None:
    first = MODEL.replace("    max_output_tokens", "    aliases: [latest]\n    max_output_tokens")
    second = first.replace("models:\n", "").replace("  m:", "  n:")
    path = card(tmp_path, first + second)
    assert issues_of(tmp_path) == [f"{path}:14: models.n.aliases.0: duplicate name 'latest': already an alias of 'm'"]


@pytest.mark.parametrize("value", ["2026-13-01", "'next monday'", "20260101", "2026-01-01 10:00:00"])
def test_bad_effective_from(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, "card.yaml", f"id: c\nversion: 1\neffective_from: {value}\n" + MODEL.lstrip("\n"))
    [issue] = issues_of(tmp_path)
    assert issue.startswith(f"{path}:3: effective_from: ")


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "'2'", "two", "true"])
def test_bad_version(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, "card.yaml", f"id: c\nversion: {value}\neffective_from: 2026-01-01\n" + MODEL.lstrip("\n"))
    [issue] = issues_of(tmp_path)
    assert issue.startswith(f"{path}:2: version: ")


def test_duplicate_id_and_version_across_files(tmp_path: Path) -> None:
    first = minimal_card(tmp_path, "a.yaml", id="default", version=3)
    second = minimal_card(tmp_path, "b.yaml", id="default", version=3)
    assert issues_of(tmp_path) == [f"{second}:2: version: card 'default' version 3 is already defined in {first}:2"]


def test_tier_naming_an_unknown_card(tmp_path: Path) -> None:
    minimal_card(tmp_path, "default.yaml")
    tiers = write(tmp_path, "tiers.yaml", "tiers:\n  default: default\n  pro: pro\n")
    assert issues_of(tmp_path) == [f"{tiers}:3: tiers.pro: tier 'pro' names unknown card 'pro' (known: default)"]


def test_invalid_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "card.yaml", "id: c\nversion: [1\n")
    [issue] = issues_of(tmp_path)
    assert issue.startswith(f"{path}:3: -: invalid YAML")


def test_a_card_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "card.yaml", "- just\n- a list\n")
    assert issues_of(tmp_path) == [f"{path}:1: -: must be a mapping of fields, the file is a CommentedSeq"]


def test_chat_model_needs_output_price_and_cap(tmp_path: Path) -> None:
    path = card(tmp_path, MODEL.replace("    max_output_tokens: 100\n", "").replace("{input: 1, output: 2}", "{input: 1}"))
    assert issues_of(tmp_path) == [
        f"{path}:5: models.m: max_output_tokens is required for chat models",
        f"{path}:7: models.m.price: price.output is required for chat models",
    ]


def test_markup_and_explicit_costs_are_exclusive(tmp_path: Path) -> None:
    path = card(tmp_path, MODEL.replace("{markup: 1.25}", "{markup: 1.25, input: 1}"))
    assert issues_of(tmp_path) == [f"{path}:9: models.m.cost.markup: give either markup or explicit costs, not both (input)"]


def test_float_is_refused_when_not_read_exactly(tmp_path: Path) -> None:
    from pricing.schema import PriceSpec

    with pytest.raises(ValueError, match="exact decimal"):
        PriceSpec.model_validate({"input": 0.15, "output": 1})


def test_every_issue_across_files_is_reported_together(tmp_path: Path) -> None:
    a = card(tmp_path, "colour: red\n" + MODEL.replace("upstream: openai", "upstream: azure").replace("input: 1,", "input: -1,"), "a.yaml")
    b = write(tmp_path, "b.yaml", "id: b\nversion: 0\neffective_from: 2026-01-01\n")
    tiers = write(tmp_path, "tiers.yaml", "tiers:\n  x: nope\n")
    assert issues_of(tmp_path) == [
        f"{a}:4: colour: unknown field",
        f"{a}:8: models.m.upstream: unknown upstream 'azure' (known: openai)",
        f"{a}:10: models.m.price.input: must not be negative (got -1)",
        f"{b}:2: version: Input should be greater than or equal to 1",
        f"{tiers}:2: tiers.x: tier 'x' names unknown card 'nope' (known: b, c)",
    ]


def test_load_rate_card_reads_one_file(tmp_path: Path) -> None:
    path = minimal_card(tmp_path, "x.yaml", id="x", version=2)
    loaded = load_rate_card(path)
    assert (loaded.id, loaded.version, loaded.source) == ("x", 2, str(path))


def test_empty_directory_is_an_error(tmp_path: Path) -> None:
    assert issues_of(tmp_path) == [f"{tmp_path}:0: -: no rate cards (*.yaml) in this directory"]


def test_audio_can_be_priced_per_minute_and_is_charged_by_the_second(tmp_path: Path) -> None:
    path = card(tmp_path, """
models:
  transcribe:
    upstream: openai
    max_output_tokens: 100
    price: {input: 0, output: 0, per_audio_minute: 0.01}
    cost: {markup: 1.25}
""")
    model = load_rate_card(path).model("transcribe")
    assert model.price.per_audio_minute == Decimal("10000")
    # 61 s x 10,000 / 60 = 10,166.67 -> 10,167; cost 10,166.67 / 1.25 = 8,133.33 -> 8,134
    charge = price_usage(model, Usage(audio_seconds=61, requests=0))
    assert (charge.price_micros, charge.cost_micros) == (10_167, 8_134)
