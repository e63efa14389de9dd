"""`metergate ratecard check|quote|diff`, run the way operators run it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .helpers import minimal_card, write

REPO = Path(__file__).resolve().parents[2]
CARDS = REPO / "config" / "ratecards"


def ratecard(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "ratecard", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def test_check_bundled_cards_succeeds_with_one_line_per_card() -> None:
    result = ratecard("check", "config/ratecards", "--config", "config/metergate.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        "ok default@1: 7 models, 2 meters, USD, effective 2026-01-01 (config/ratecards/default.yaml)",
        "ok pro@1: 5 models, 1 meter, USD, effective 2026-01-01 (config/ratecards/pro.yaml)",
        "tiers: default -> default, pro -> pro",
    ]


def test_check_reports_every_error_with_file_and_line(tmp_path: Path) -> None:
    bad = write(
        tmp_path,
        "bad.yaml",
        """
        id: bad
        version: 1
        effective_from: 2026-02-30
        models:
          m:
            upstream: azure
            max_output_tokens: 10
            price: {input: -1, output: 1}
            cost: {markup: 1.25}
        """,
    )
    broken = write(tmp_path, "broken.yaml", "id: [\n")
    result = ratecard("check", tmp_path, "--upstreams", "openai")
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"{bad}:3: effective_from: '2026-02-30' is not a valid date (YYYY-MM-DD): day is out of range for month",
        f"{bad}:6: models.m.upstream: unknown upstream 'azure' (known: openai)",
        f"{bad}:8: models.m.price.input: must not be negative (got -1)",
        f"{broken}:2: -: invalid YAML: expected the node content, but found '<stream end>'",
    ]
    assert "4 problems in 2 files" in result.stderr


def test_check_accepts_single_files(tmp_path: Path) -> None:
    card = minimal_card(tmp_path, "one.yaml", id="one", version=7)
    result = ratecard("check", card)
    assert result.returncode == 0
    assert result.stdout.splitlines() == [f"ok one@7: 1 model, USD, effective 2026-01-01 ({card})"]


def test_check_missing_path_fails(tmp_path: Path) -> None:
    result = ratecard("check", tmp_path / "nope.yaml")
    assert result.returncode == 1
    assert result.stdout.strip() == f"{tmp_path / 'nope.yaml'}:0: -: no such file or directory"


def test_quote_prints_exact_charge_cost_and_margin() -> None:
    # 800 x 0.1875 + 200 x 0.09375 + 500 x 0.75 + 1 x 31250 = 31793.75 -> 31794; cost / 1.25 = 25435
    result = ratecard(
        "quote", "--card", CARDS / "default.yaml", "--model", "gpt-4o-mini",
        "--input-tokens", "1000", "--output-tokens", "500", "--cached-tokens", "200", "--tool", "web_search=1",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "charge: 31794 micros (0.031794 USD)" in lines
    assert "cost: 25435 micros (0.025435 USD)" in lines
    assert "margin: 6359 micros (0.006359 USD, 20.00% of charge)" in lines


def test_quote_with_reasoning_tokens_and_explicit_cost() -> None:
    # o3-mini on pro: 1000 x 1.21 + 2000 x 4.84 + 100 (per-request fee) = 10990; cost 1100 + 8800 = 9900
    result = ratecard(
        "quote", "--card", CARDS / "pro.yaml", "--model", "o3-mini",
        "--input-tokens", "1000", "--output-tokens", "2000", "--reasoning-tokens", "1500",
    )
    assert result.returncode == 0, result.stderr
    assert "charge: 10990 micros (0.010990 USD)" in result.stdout.splitlines()
    assert "cost: 9900 micros (0.009900 USD)" in result.stdout.splitlines()


def test_quote_by_alias() -> None:
    result = ratecard("quote", "--card", CARDS / "default.yaml", "--model", "gpt-4o-2024-08-06", "--input-tokens", "1", "--output-tokens", "0")
    assert result.returncode == 0
    assert "charge: 4 micros (0.000004 USD)" in result.stdout.splitlines()  # 3.125 -> 4


def test_quote_unknown_model_fails() -> None:
    result = ratecard("quote", "--card", CARDS / "default.yaml", "--model", "gpt-9", "--input-tokens", "1", "--output-tokens", "1")
    assert result.returncode == 1
    assert "no model 'gpt-9' on card default@1" in result.stderr


def test_diff_shows_changes_added_and_removed_models(tmp_path: Path) -> None:
    old = write(
        tmp_path,
        "v1.yaml",
        """
        id: c
        version: 1
        effective_from: 2026-01-01
        models:
          a: {upstream: openai, max_output_tokens: 10, price: {input: 0.15, output: 0.60}, cost: {markup: 1.25}}
          gone: {upstream: openai, max_output_tokens: 10, price: {input: 1, output: 1}, cost: {markup: 1.25}}
        """,
    )
    new = write(
        tmp_path,
        "v2.yaml",
        """
        id: c
        version: 2
        effective_from: 2026-06-01
        models:
          a: {upstream: openai, max_output_tokens: 10, price: {input: 0.15, output: 0.66, per_request: 0.001}, cost: {markup: 1.25}}
          fresh: {upstream: openai, max_output_tokens: 10, price: {input: 2, output: 8}, cost: {markup: 1.25}}
        """,
    )
    result = ratecard("diff", old, new)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"--- c@1 ({old})",
        f"+++ c@2 ({new})",
        "effective_from: 2026-01-01 -> 2026-06-01",
        "removed model gone",
        "added model fresh (chat): input 2, output 8 USD/1M tokens",
        "a output: 0.6 -> 0.66 (+0.06, +10.00%) USD/1M tokens",
        "a per_request: 0 -> 0.001 (+0.001, new charge) USD/unit",
    ]


def test_diff_of_a_card_with_itself_has_no_changes() -> None:
    result = ratecard("diff", CARDS / "default.yaml", CARDS / "default.yaml")
    assert result.returncode == 0
    assert result.stdout.splitlines()[-1] == "no price changes"


def test_diff_of_a_broken_card_fails_with_its_line(tmp_path: Path) -> None:
    bad = write(tmp_path, "bad.yaml", "id: c\nversion: 1\neffective_from: 2026-01-01\nmodles: {}\n")
    result = ratecard("diff", CARDS / "default.yaml", bad)
    assert result.returncode == 1
    assert result.stdout.strip() == f"{bad}:4: modles: unknown field"


CREDITS_CONFIG = "upstreams: {openai: {base_url: 'https://api.openai.com/v1'}}\nassets: {credits: {usd_per_unit: '0.01'}}\n"


def _credits_card(directory: Path, name: str, card_id: str, asset: str) -> Path:
    text = (directory / minimal_card(directory, name, id=card_id).name).read_text()
    return write(directory, name, f"asset: {asset}\n" + text)


def test_check_refuses_an_asset_the_config_does_not_define(tmp_path: Path) -> None:
    card = _credits_card(tmp_path, "gems.yaml", "gems", "gems")
    config = write(tmp_path, "metergate.yaml", CREDITS_CONFIG)
    result = ratecard("check", card, "--config", config)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"{card}:1: asset: asset 'gems' is not defined in the config's `assets` (defined: USD, credits)"]


def test_check_refuses_a_card_whose_asset_no_tier_can_use(tmp_path: Path) -> None:
    cards = tmp_path / "cards"
    cards.mkdir()
    minimal_card(cards, "default.yaml", id="default")
    orphan = _credits_card(cards, "credits.yaml", "credits", "credits")
    write(cards, "tiers.yaml", "tiers: {default: default}\n")
    result = ratecard("check", cards, "--config", write(tmp_path, "metergate.yaml", CREDITS_CONFIG))
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"{orphan}:1: asset: card 'credits' prices in 'credits', which no tier's card uses: no wallet could pay by it "
        "(a wallet's asset comes from its tier's card)"]


def test_check_accepts_a_credits_card_that_a_tier_uses(tmp_path: Path) -> None:
    cards = tmp_path / "cards"
    cards.mkdir()
    minimal_card(cards, "default.yaml", id="default")
    _credits_card(cards, "credits.yaml", "credits", "credits")
    write(cards, "tiers.yaml", "tiers: {default: default, arcade: credits}\n")
    result = ratecard("check", cards, "--config", write(tmp_path, "metergate.yaml", CREDITS_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok credits@1: 1 model, credits, effective 2026-01-01" in result.stdout
