"""How micros are shown to people and in answers (`X-Usage-Cost`, `X-Wallet-Balance`,
`usage.cost`): exactly what the Decimal they stand for formats as."""

from __future__ import annotations

import random
from decimal import Decimal

import pytest

from proxy.metering import usd_number
from proxy.schemas import usd

EDGES = [0, 1, -1, 9, 999_999, 1_000_000, -1_000_000, 1_000_001, -999_999, 17, 10**18, -(10**18) - 7, 2**63 - 1, -(2**63)]


def _samples() -> list[int]:
    rng = random.Random(20261204)
    return EDGES + [rng.randint(-(10**7), 10**7) for _ in range(3000)] + [rng.randint(-(2**80), 2**80) for _ in range(3000)]


def test_usd_places_six_decimals_as_decimal_formatting_does():
    for micros in _samples():
        assert usd(micros) == f"{Decimal(micros).scaleb(-6):.6f}", micros


@pytest.mark.parametrize(("micros", "shown"), [(0, "0.000000"), (17, "0.000017"), (-1, "-0.000001"),
                                               (1_234_567, "1.234567"), (-1_000_000, "-1.000000")])
def test_usd_reads_as_dollars(micros: int, shown: str):
    assert usd(micros) == shown


def test_usd_of_a_decimal_rounds_to_a_whole_micro():
    assert usd(Decimal("1.5")) == "0.000002"  # not an int: the Decimal path, half to even


def test_usd_number_is_the_nearest_float_to_the_exact_amount():
    for micros in _samples():
        assert usd_number(micros) == float(Decimal(micros).scaleb(-6)), micros
