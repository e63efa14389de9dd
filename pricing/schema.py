"""The rate card file format, as pydantic models (shape and types only).

Rules that span fields or files (upstream names, duplicate aliases, markup vs
explicit costs, duplicate versions, tiers) are checked in `pricing.cards`,
where each complaint can be pointed at the exact line.

Prices are written as people write them: USD per 1M tokens for token prices,
USD per unit for everything else. They are read as exact Decimals; a float
reaching these models is refused rather than trusted.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, StrictStr

Kind = Literal["chat", "completion", "embedding", "image", "speech", "transcription"]


def _exact_decimal(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    if isinstance(value, float):
        # Only reachable when the document was not read with exact numbers.
        raise ValueError("must be an exact decimal (read with exact_numbers=True), got a float")
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, str):
        try:
            return Decimal(value.strip().replace("_", ""))
        except InvalidOperation:
            raise ValueError(f"{value!r} is not a number") from None
    return value


def _iso_date(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        raise ValueError("must be a date (YYYY-MM-DD), not a date and time")
    if isinstance(value, dt.date):
        return value
    if isinstance(value, str):
        try:
            return dt.date.fromisoformat(value.strip())
        except ValueError as exc:
            raise ValueError(f"{value!r} is not a valid date (YYYY-MM-DD): {exc}") from None
    raise ValueError(f"must be a date written YYYY-MM-DD, got {value!r}")


Money = Annotated[Decimal, BeforeValidator(_exact_decimal), Field(ge=0, allow_inf_nan=False)]
Markup = Annotated[Decimal, BeforeValidator(_exact_decimal), Field(gt=0, allow_inf_nan=False)]
Multiplier = Markup  # a service tier's factor on the token prices: positive, exact
IsoDate = Annotated[dt.date, BeforeValidator(_iso_date)]
Name = Annotated[str, Field(min_length=1)]
CardId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PriceSpec(_Strict):
    """What the end user pays. Token prices: USD per 1M tokens; the rest: USD per unit."""

    input: Money
    output: Money | None = None  # required for chat and completion models
    cached_input: Money | None = None  # defaults to input
    reasoning: Money | None = None  # defaults to output
    per_request: Money = Decimal(0)
    per_image: Money = Decimal(0)
    per_audio_second: Money = Decimal(0)
    per_audio_minute: Money = Decimal(0)  # charged by the second: price x seconds / 60
    tools: dict[Name, Money] = {}  # tool name -> USD per call
    # Image models: USD per image by size and quality, {"1024x1024": {standard: 0.04, hd: 0.08}};
    # a request's size or quality not listed is refused; each size's first quality is its default.
    images: dict[StrictStr, dict[StrictStr, Money]] = {}


class CostSpec(_Strict):
    """What a call costs us: `markup` (cost = price / markup) or the same keys as price."""

    markup: Markup | None = None
    input: Money | None = None
    output: Money | None = None
    cached_input: Money | None = None
    reasoning: Money | None = None
    per_request: Money | None = None
    per_image: Money | None = None
    per_audio_second: Money | None = None
    per_audio_minute: Money | None = None
    tools: dict[Name, Money] | None = None
    images: dict[StrictStr, dict[StrictStr, Money]] | None = None


PositiveInt = Annotated[StrictInt, Field(gt=0)]
Tokens = Annotated[StrictInt, Field(ge=0)]


class ImageInputSpec(_Strict):
    """Image parts, by the provider's tile formula (OpenAI's for the gpt-4o family):
    fit within fit_px x fit_px, scale the short side down to short_side_px, then
    base_tokens + tile_tokens per tile_px x tile_px tile; `detail: low` is a flat
    low_detail_tokens."""

    base_tokens: Tokens
    tile_tokens: Tokens
    tile_px: PositiveInt
    fit_px: PositiveInt
    short_side_px: PositiveInt
    low_detail_tokens: Tokens


class FileInputSpec(_Strict):
    """File parts (PDFs...), bounded from their size: ceil(KiB x tokens_per_kib),
    at least min_tokens, at most max_tokens (if set) per file."""

    tokens_per_kib: Tokens
    min_tokens: Tokens = 0
    max_tokens: PositiveInt | None = None


class AudioInputSpec(_Strict):
    """`input_audio` parts, bounded by duration: bytes / the format's least
    bytes per second, times tokens_per_second (in prompt tokens at the card's
    input price: the provider's audio tokens per second x its audio-to-text
    price ratio). A format not listed is refused."""

    tokens_per_second: Tokens
    min_bytes_per_second: dict[Name, PositiveInt]
    min_tokens: Tokens = 0


class AudioFilesSpec(_Strict):
    """Transcription models: an uploaded file's duration is bounded by its size over the least bytes
    per second of its format (by file extension); a format not listed is refused."""

    min_bytes_per_second: dict[Name, PositiveInt]


class InputsSpec(_Strict):
    """How non-text content parts are held for, in prompt tokens. A part type
    with no entry here is refused, never let through unpriced."""

    image: ImageInputSpec | None = None
    file: FileInputSpec | None = None
    audio: AudioInputSpec | None = None


class ModelSpec(_Strict):
    upstream: Name
    upstream_model: Name | None = None  # defaults to the model's public name
    kind: Kind = "chat"
    aliases: list[Name] = []
    max_output_tokens: Annotated[StrictInt, Field(gt=0)] | None = None  # required unless embedding
    description: str | None = None
    price: PriceSpec
    cost: CostSpec
    # OpenAI's `service_tier` -> multiplier of the token prices (price and cost);
    # `default` is 1 unless given. A tier not listed is refused (400).
    service_tiers: dict[Name, Multiplier] = {}
    inputs: InputsSpec = InputsSpec()  # non-text content parts; none priced by default
    audio_files: AudioFilesSpec | None = None  # transcription models: how long an upload can be


class MeterMarkupSpec(_Strict):
    markup: Markup


class IncludedSpec(_Strict):
    """Units of a meter each end user gets free per calendar period (UTC) before it is charged."""

    quantity: Money
    per: Literal["day", "month"]


class MeterSpec(_Strict):
    """A non-token meter (crawler hours, pages, GB...): USD per unit."""

    unit: Name
    price: Money
    cost: Any  # a number (USD per unit) or {markup: X}; checked in pricing.cards
    included: IncludedSpec | None = None
    description: str | None = None


class OutcomeSpec(_Strict):
    """A price per outcome (a resolved conversation, a booked meeting), captured by name from a job hold."""

    price: Money
    cost: Money = Decimal(0)
    description: str | None = None


class CardSpec(_Strict):
    """A card's header. Each entry of `models` / `meters` is validated on its own
    (`ModelSpec`, `MeterSpec`), so one broken model does not hide the others' problems."""

    id: CardId
    version: Annotated[StrictInt, Field(ge=1)]
    effective_from: IsoDate
    # The asset the card prices in: an ISO currency (USD) or an asset the
    # service's config defines (lower case, e.g. credits). `asset:` is the same field.
    currency: Annotated[str, Field(pattern=r"^(?:[A-Z]{3}|[a-z][a-z0-9_]{0,31})$",
                                   validation_alias=AliasChoices("currency", "asset"))] = "USD"
    description: str | None = None
    models: dict[Name, Any] = {}
    meters: dict[Name, Any] = {}
    outcomes: dict[Name, OutcomeSpec] = {}  # USD per outcome


class TiersSpec(_Strict):
    tiers: dict[Name, CardId]
    # Per tier: the least output (tokens per choice) worth forwarding when a
    # wallet or key cannot cover a call's worst case; the call is then sent with
    # max_tokens lowered to what it can afford. 0 turns clamping off (a 402
    # instead). Tiers not listed use DEFAULT_CLAMP_MIN_OUTPUT_TOKENS.
    clamp_min_output_tokens: dict[Name, Annotated[StrictInt, Field(ge=0)]] = {}
