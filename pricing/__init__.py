"""Rate cards, token estimation and charge arithmetic for metergate.

Pure: reads rate card files, never touches the network, never imports `proxy`.
Money is integer micros (1 USD = 1,000,000); prices are exact Decimals.
"""

from pricing.cards import (
    MeterPrice,
    ModelPrice,
    RateCard,
    RateCardError,
    RateCardSet,
    load_rate_card,
    load_rate_card_files,
    load_rate_cards,
)
from pricing.money import Charge, Rates, Usage, format_micros, price_meter, price_usage
from pricing.tokens import count_text_tokens, estimate_prompt_tokens, estimate_usage, output_token_bound

__all__ = [
    "Charge",
    "MeterPrice",
    "ModelPrice",
    "RateCard",
    "RateCardError",
    "RateCardSet",
    "Rates",
    "Usage",
    "count_text_tokens",
    "estimate_prompt_tokens",
    "estimate_usage",
    "format_micros",
    "load_rate_card",
    "load_rate_card_files",
    "load_rate_cards",
    "output_token_bound",
    "price_meter",
    "price_usage",
]
