"""Which card applies: tiers, versions, effective dates and pins."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest

from pricing import RateCardSet, load_rate_cards

from .helpers import minimal_card, write


@pytest.fixture
def cards(tmp_path: Path) -> RateCardSet:
    minimal_card(tmp_path, "default-v1.yaml", id="default", version=1, effective_from="2026-01-01")
    minimal_card(tmp_path, "default-v2.yaml", id="default", version=2, effective_from="2026-03-01")
    minimal_card(tmp_path, "default-v3.yaml", id="default", version=3, effective_from="2027-01-01")
    minimal_card(tmp_path, "pro.yaml", id="pro", version=1, effective_from="2026-01-01")
    write(tmp_path, "tiers.yaml", "tiers:\n  free: default\n  pro: pro\n")
    return load_rate_cards(tmp_path)


def test_tier_maps_to_its_card(cards: RateCardSet) -> None:
    assert cards.card_for("pro", today=date(2026, 6, 1)).ref == "pro@1"


def test_highest_version_in_effect_wins(cards: RateCardSet) -> None:
    assert cards.card_for("free", today=date(2026, 6, 1)).ref == "default@2"


def test_version_with_future_effective_from_is_not_used_yet(cards: RateCardSet) -> None:
    assert cards.card_for("free", today=date(2026, 2, 28)).ref == "default@1"
    assert cards.card_for("free", today=date(2026, 12, 31)).ref == "default@2"


def test_version_applies_on_its_effective_day(cards: RateCardSet) -> None:
    assert cards.card_for("free", today=date(2027, 1, 1)).ref == "default@3"


def test_card_with_no_version_in_effect_is_a_key_error(cards: RateCardSet) -> None:
    with pytest.raises(KeyError):
        cards.card_for("free", today=date(2025, 12, 31))


def test_unknown_tier_is_a_key_error(cards: RateCardSet) -> None:
    with pytest.raises(KeyError):
        cards.card_for("enterprise")


def test_exact_pin_is_grandfathered(cards: RateCardSet) -> None:
    assert cards.card_for("free", pin="default@1", today=date(2026, 6, 1)).ref == "default@1"


def test_pin_to_a_card_id_takes_its_latest_version_in_effect(cards: RateCardSet) -> None:
    assert cards.card_for("pro", pin="default", today=date(2026, 6, 1)).ref == "default@2"


@pytest.mark.parametrize("pin", ["default@9", "nope", "nope@1", "default@x", "default@"])
def test_unknown_pin_is_a_key_error(cards: RateCardSet, pin: str) -> None:
    with pytest.raises(KeyError):
        cards.card_for("free", pin=pin, today=date(2026, 6, 1))


def test_today_defaults_to_the_current_date(cards: RateCardSet) -> None:
    assert cards.card_for("pro").ref == "pro@1"


def test_without_a_tiers_file_each_card_is_its_own_tier(tmp_path: Path) -> None:
    minimal_card(tmp_path, "basic.yaml", id="basic")
    assert load_rate_cards(tmp_path).tiers == {"basic": "basic"}


def test_versions_are_listed_oldest_first(cards: RateCardSet) -> None:
    assert [c.version for c in cards.cards["default"]] == [1, 2, 3]


def test_model_resolves_aliases(tmp_path: Path) -> None:
    write(
        tmp_path,
        "c.yaml",
        """
        id: c
        version: 1
        effective_from: 2026-01-01
        models:
          gpt-4o-mini:
            upstream: openai
            aliases: [gpt-4o-mini-2024-07-18]
            max_output_tokens: 100
            price: {input: 0.15, output: 0.6}
            cost: {markup: 1.25}
        """,
    )
    card = load_rate_cards(tmp_path).card_for("c")
    by_alias = card.model("gpt-4o-mini-2024-07-18")
    assert by_alias is not None and by_alias.name == "gpt-4o-mini" and by_alias.upstream_model == "gpt-4o-mini"
    assert card.model("gpt-4o-mini") is by_alias
    assert card.model("gpt-5") is None
