"""Small builders shared by the pricing tests."""

from __future__ import annotations

import textwrap
from decimal import Decimal
from pathlib import Path

from pricing import ModelPrice, Rates

D = Decimal


def model(price: Rates, cost: Rates | None = None, *, divisor: str = "1", kind: str = "chat", cap: int = 1000) -> ModelPrice:
    return ModelPrice(
        name="m",
        upstream="openai",
        upstream_model="m",
        kind=kind,  # type: ignore[arg-type]
        max_output_tokens=cap,
        price=price,
        cost=cost or price,
        cost_divisor=D(divisor),
    )


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


MINIMAL_CARD = """
id: {id}
version: {version}
effective_from: {effective_from}
models:
  gpt-4o-mini:
    upstream: openai
    max_output_tokens: 100
    price: {{input: 0.15, output: 0.60}}
    cost: {{markup: 1.25}}
"""


def minimal_card(directory: Path, name: str, id: str = "default", version: int = 1, effective_from: str = "2026-01-01") -> Path:
    return write(directory, name, MINIMAL_CARD.format(id=id, version=version, effective_from=effective_from))
