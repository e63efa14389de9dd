"""Rate cards: load, validate, version, and pick the one that applies.

A rate card is one YAML file holding one version of one card (`id`, `version`,
`effective_from`). Older versions stay on disk so grandfathered users pinned to
`card@version` keep their prices. `tiers.yaml` maps tier names to card ids.

Loading collects every problem in every file before failing, and each problem
names `file:line: field: message`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from pricing.money import _EXACT, MICROS_PER_UNIT, ZERO, Rates
from pricing.schema import CardSpec, CostSpec, InputsSpec, MeterMarkupSpec, MeterSpec, ModelSpec, PriceSpec, TiersSpec, _exact_decimal
from pricing.yaml_source import SourceError, SourceIssue, line_of, read_yaml

TIERS_STEMS = ("tiers",)
CARD_SUFFIXES = (".yaml", ".yml")
ONE = Decimal(1)


class RateCardError(SourceError):
    """One or more rate card files are wrong; `.issues` lists every problem found."""


@dataclass(frozen=True)
class ModelPrice:
    name: str
    upstream: str
    upstream_model: str
    kind: Literal["chat", "completion", "embedding", "image", "speech", "transcription"]
    max_output_tokens: int  # the card's output cap (0 unless chat or completion)
    price: Rates  # micros, what the end user pays
    cost: Rates  # micros, what the provider charges us (before `cost_divisor`)
    cost_divisor: Decimal = ONE  # a markup: cost = cost rates / markup
    aliases: tuple[str, ...] = ()
    # How image/file/audio parts are held for; a part type left out is refused.
    inputs: InputsSpec = field(default_factory=InputsSpec)
    # `service_tier` -> multiplier of the token prices (both sides); "default" is 1 unless listed.
    service_tiers: Mapping[str, Decimal] = field(default_factory=dict)
    # Transcription models: the least bytes per second of each accepted upload format.
    audio_min_bytes_per_second: Mapping[str, int] = field(default_factory=dict)
    # Image models: (size, quality) -> (price, cost) in micros per image, in the card's order.
    image_prices: Mapping[tuple[str, str], tuple[Decimal, Decimal]] = field(default_factory=dict)

    def for_image(self, size: str | None, quality: str | None) -> ModelPrice:
        """This model priced per image at `size` and `quality` (None: the card's first size, and that
        size's first quality); KeyError when the card does not price them."""
        if not self.image_prices:
            return self
        sizes = list(dict.fromkeys(s for s, _ in self.image_prices))
        size = size or sizes[0]
        quality = quality or next((q for s, q in self.image_prices if s == size), "")
        price, cost = self.image_prices[(size, quality)]
        return replace(self, price=replace(self.price, per_image=price), cost=replace(self.cost, per_image=cost),
                       image_prices={})

    def at_service_tier(self, tier: str) -> ModelPrice:
        """This model priced at `tier`; KeyError when the card does not price it.
        The common 1x case is this very object, so its cached integer rates are reused."""
        return self._tiered[tier]

    @cached_property
    def _tiered(self) -> dict[str, ModelPrice]:
        # Built once per card load: a tiered call prices from cached integer rates like any other.
        factors = {"default": ONE, **self.service_tiers}
        tiered: dict[str, ModelPrice] = {}
        for tier, factor in factors.items():
            if factor == ONE:
                tiered[tier] = self
                continue
            price = _tokens_times(self.price, factor)
            cost = price if self.cost is self.price else _tokens_times(self.cost, factor)
            tiered[tier] = replace(self, price=price, cost=cost, service_tiers={})
        return tiered


def _tokens_times(rates: Rates, factor: Decimal) -> Rates:
    """`rates` with its token prices times `factor`, exactly. Per-unit prices (requests,
    tool calls, images, audio) are not what a service tier changes, so they stay."""

    def times(value: Decimal) -> Decimal:
        return _EXACT.multiply(value, factor)

    return replace(
        rates, input=times(rates.input), output=times(rates.output),
        cached_input=None if rates.cached_input is None else times(rates.cached_input),
        reasoning=None if rates.reasoning is None else times(rates.reasoning),
    )


@dataclass(frozen=True)
class MeterPrice:
    name: str
    unit: str
    price: Decimal  # micros per unit
    cost: Decimal  # micros per unit (before `cost_divisor`)
    cost_divisor: Decimal = ONE
    included_quantity: Decimal = ZERO  # free units per end user and `included_per` period
    included_per: str | None = None  # "day" or "month" (UTC)


@dataclass(frozen=True)
class OutcomePrice:
    name: str
    price: Decimal  # micros per outcome
    cost: Decimal  # micros per outcome


@dataclass(frozen=True)
class RateCard:
    id: str
    version: int
    effective_from: dt.date
    source: str
    models: dict[str, ModelPrice]
    meters: dict[str, MeterPrice]
    currency: str = "USD"
    description: str | None = None
    _aliases: dict[str, str] = field(default_factory=dict, repr=False, compare=False)
    outcomes: dict[str, OutcomePrice] = field(default_factory=dict)

    @property
    def asset(self) -> str:
        """What the card's prices are micros of, and so the asset of the wallets it serves."""
        return self.currency

    @property
    def ref(self) -> str:
        """`id@version`: what a grandfathered user is pinned to."""
        return f"{self.id}@{self.version}"

    def model(self, name: str) -> ModelPrice | None:
        found = self.models.get(name)
        if found is None:
            canonical = self._aliases.get(name)
            found = self.models.get(canonical) if canonical is not None else None
        return found


def _utc_today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


# The least output worth forwarding under a clamped max_tokens, for tiers whose
# tiers.yaml does not say: a short answer, not a truncated sentence.
DEFAULT_CLAMP_MIN_OUTPUT_TOKENS = 256


@dataclass(frozen=True)
class RateCardSet:
    cards: dict[str, tuple[RateCard, ...]]  # card id -> every version, oldest first
    tiers: dict[str, str]  # tier name -> card id
    clamp_min_output_tokens: dict[str, int] = field(default_factory=dict)  # tier -> tokens per choice (0: off)

    def min_output_tokens(self, tier: str) -> int:
        """The least output per choice a clamped call of this tier is forwarded with; 0: never clamp."""
        return self.clamp_min_output_tokens.get(tier, DEFAULT_CLAMP_MIN_OUTPUT_TOKENS)

    def versions(self, card_id: str) -> tuple[RateCard, ...]:
        return self.cards.get(card_id, ())

    def latest(self, card_id: str, today: dt.date | None = None) -> RateCard:
        """The highest version of `card_id` in effect on `today` (UTC). KeyError if none."""
        today = today or _utc_today()
        versions = self.cards.get(card_id)
        if not versions:
            raise KeyError(f"unknown rate card {card_id!r}")
        for card in reversed(versions):
            if card.effective_from <= today:
                return card
        raise KeyError(f"rate card {card_id!r} has no version in effect on {today.isoformat()}")

    def exact(self, card_id: str, version: int) -> RateCard:
        for card in self.cards.get(card_id, ()):
            if card.version == version:
                return card
        raise KeyError(f"unknown rate card version {card_id}@{version}")

    def card_for(self, tier: str, pin: str | None = None, today: dt.date | None = None) -> RateCard:
        """The card a user on `tier` pays by; a `pin` ("id" or "id@version") wins over the tier."""
        if pin:
            card_id, sep, version = pin.partition("@")
            if sep:
                if not version.isdigit():
                    raise KeyError(f"bad rate card pin {pin!r}")
                return self.exact(card_id, int(version))
            return self.latest(card_id, today)
        try:
            card_id = self.tiers[tier]
        except KeyError:
            raise KeyError(f"unknown tier {tier!r}") from None
        return self.latest(card_id, today)

    def all_cards(self) -> list[RateCard]:
        return [card for versions in self.cards.values() for card in versions]


# ---------------------------------------------------------------- validation


def _issue(path: Path, document: Any, loc: Iterable[str | int], message: str) -> SourceIssue:
    loc = list(loc)
    return SourceIssue(str(path), line_of(document, loc), ".".join(str(p) for p in loc) or "-", message)


def _validation_issues(path: Path, document: Any, error: ValidationError, prefix: list[str | int] | None = None) -> list[SourceIssue]:
    """Like `issues_from_validation`, with rate-card wording and missing fields at their parent's line."""
    issues = []
    for err in error.errors():
        loc = list(prefix or []) + [p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        message = err["msg"]
        kind = err["type"]
        if kind == "extra_forbidden":
            message = "unknown field"
        elif kind == "missing":
            message = "missing required field"
        elif kind == "greater_than_equal" and err.get("ctx", {}).get("ge") in (0, Decimal(0)):
            message = f"must not be negative (got {err.get('input')})"
        elif kind == "value_error":
            message = message.removeprefix("Value error, ")
        line_loc = loc[:-1] if kind == "missing" else loc
        field_name = ".".join(str(p) for p in loc) or "-"
        issues.append(SourceIssue(str(path), line_of(document, line_loc), field_name, message))
    return issues


def _micros_per_unit(usd: Decimal) -> Decimal:
    return usd * MICROS_PER_UNIT  # exact: Decimal multiplication by an int with room to spare


def _rates(spec: PriceSpec | CostSpec, fallback_output: Decimal = ZERO) -> Rates:
    # Token prices: USD per 1M tokens == micros per token, as written.
    return Rates(
        input=spec.input if spec.input is not None else ZERO,
        output=spec.output if spec.output is not None else fallback_output,
        cached_input=spec.cached_input,
        reasoning=spec.reasoning,
        per_request=_micros_per_unit(spec.per_request or ZERO),
        tools={name: _micros_per_unit(p) for name, p in (spec.tools or {}).items()},
        per_image=_micros_per_unit(spec.per_image or ZERO),
        per_audio_second=_micros_per_unit(spec.per_audio_second or ZERO),
        per_audio_minute=_micros_per_unit(spec.per_audio_minute or ZERO),
    )


def _check_model(path: Path, document: Any, name: str, spec: ModelSpec) -> list[SourceIssue]:
    issues: list[SourceIssue] = []
    at = ["models", name]
    if spec.kind == "image":
        if not spec.price.images and not spec.price.per_image:
            issues.append(_issue(path, document, at + ["price"], "an image model needs price.images (or per_image)"))
        if spec.cost.markup is None and spec.price.images and spec.cost.images is None:
            issues.append(_issue(path, document, at + ["cost"], "give cost.images (or a markup) for an image model's prices"))
        if spec.cost.images is not None and set(_image_keys(spec.cost.images)) != set(_image_keys(spec.price.images)):
            issues.append(_issue(path, document, at + ["cost", "images"], "must list the same sizes and qualities as price.images"))
    elif spec.kind == "transcription":
        if spec.audio_files is None:
            issues.append(_issue(path, document, at, "a transcription model needs audio_files.min_bytes_per_second"))
        if not spec.price.per_audio_minute and not spec.price.per_audio_second:
            issues.append(_issue(path, document, at + ["price"], "a transcription model needs per_audio_minute (or per_audio_second)"))
    elif spec.kind in ("chat", "completion"):
        if spec.max_output_tokens is None:
            issues.append(_issue(path, document, at, f"max_output_tokens is required for {spec.kind} models"))
        if spec.price.output is None:
            issues.append(_issue(path, document, at + ["price"], f"price.output is required for {spec.kind} models"))
    image = spec.inputs.image
    if image is not None and image.short_side_px > image.fit_px:
        issues.append(_issue(path, document, at + ["inputs", "image", "short_side_px"],
                             f"must not exceed fit_px ({image.short_side_px} > {image.fit_px})"))
    cost = spec.cost
    explicit = [k for k in CostSpec.model_fields if k != "markup" and getattr(cost, k) is not None]
    if cost.markup is not None and explicit:
        issues.append(
            _issue(path, document, at + ["cost", "markup"], f"give either markup or explicit costs, not both ({', '.join(explicit)})")
        )
    elif cost.markup is None:
        if cost.input is None:
            issues.append(_issue(path, document, at + ["cost"], "give markup, or explicit costs including input"))
        if spec.kind in ("chat", "completion") and cost.output is None and cost.input is not None:
            issues.append(_issue(path, document, at + ["cost"], f"cost.output is required for {spec.kind} models"))
    return issues


def _image_keys(images: Mapping[str, Mapping[str, Decimal]]) -> list[tuple[str, str]]:
    return [(size, quality) for size, qualities in images.items() for quality in qualities]


def _image_prices(m: ModelSpec) -> dict[tuple[str, str], tuple[Decimal, Decimal]]:
    """(size, quality) -> (price, cost) micros per image; a markup's cost is divided later, as for tokens."""
    costs = m.cost.images or m.price.images
    return {(size, quality): (_micros_per_unit(usd), _micros_per_unit(costs.get(size, {}).get(quality, usd)))
            for size, qualities in m.price.images.items() for quality, usd in qualities.items()}


def _check_names(
    path: Path, document: Any, raw_models: dict[str, Any], upstreams: Collection[str] | None
) -> list[SourceIssue]:
    """Aliases and upstreams, read from the raw entries so they are checked even
    when the rest of a model is broken."""
    issues = []
    seen: dict[str, str] = {name: f"model {name!r}" for name in raw_models}
    for name, raw in raw_models.items():
        if not isinstance(raw, dict):
            continue
        upstream = raw.get("upstream")
        if upstreams is not None and isinstance(upstream, str) and upstream and upstream not in upstreams:
            known = ", ".join(sorted(upstreams)) or "none configured"
            issues.append(_issue(path, document, ["models", name, "upstream"], f"unknown upstream {upstream!r} (known: {known})"))
        aliases = raw.get("aliases")
        for index, alias in enumerate(aliases if isinstance(aliases, list) else []):
            if not isinstance(alias, str):
                continue
            if alias in seen:
                issues.append(
                    _issue(path, document, ["models", name, "aliases", index], f"duplicate name {alias!r}: already {seen[alias]}")
                )
            else:
                seen[alias] = f"an alias of {name!r}"
    return issues


def _meter_cost(path: Path, document: Any, name: str, raw: Any) -> tuple[Decimal, Decimal, list[SourceIssue]]:
    loc = ["meters", name, "cost"]
    if isinstance(raw, dict):
        try:
            spec = MeterMarkupSpec.model_validate(raw)
        except ValidationError as exc:
            issues = []
            for err in exc.errors():
                sub = loc + list(err["loc"])
                msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
                issues.append(_issue(path, document, sub, msg))
            return ZERO, ONE, issues
        return ZERO, spec.markup, []
    try:
        value = _exact_decimal(raw)
        if not isinstance(value, Decimal) or not value.is_finite():
            raise ValueError(f"must be a number (USD per unit) or {{markup: X}}, got {raw!r}")
        if value < 0:
            raise ValueError(f"must not be negative (got {value})")
    except ValueError as exc:
        return ZERO, ONE, [_issue(path, document, loc, str(exc))]
    return value, ONE, []


def _build_card(
    path: Path, document: Any, spec: CardSpec | None, upstreams: Collection[str] | None, issues: list[SourceIssue]
) -> RateCard | None:
    """Validate each model and meter (adding to `issues`); the card if nothing at all is wrong."""
    raw_models = spec.models if spec is not None else _raw_section(document, "models")
    raw_meters = spec.meters if spec is not None else _raw_section(document, "meters")
    model_specs: dict[str, ModelSpec] = {}
    for name, raw in raw_models.items():
        try:
            model_specs[name] = ModelSpec.model_validate(raw)
        except ValidationError as exc:
            issues += _validation_issues(path, document, exc, ["models", name])
    meter_specs: dict[str, MeterSpec] = {}
    for name, raw in raw_meters.items():
        try:
            meter_specs[name] = MeterSpec.model_validate(raw)
        except ValidationError as exc:
            issues += _validation_issues(path, document, exc, ["meters", name])
    issues += _check_names(path, document, raw_models, upstreams)
    models: dict[str, ModelPrice] = {}
    aliases: dict[str, str] = {}
    for name, m in model_specs.items():
        issues += _check_model(path, document, name, m)
        price = _rates(m.price)
        if m.cost.markup is not None:
            cost, divisor = price, m.cost.markup
        else:
            cost, divisor = _rates(m.cost), ONE
        models[name] = ModelPrice(
            name=name,
            upstream=m.upstream,
            upstream_model=m.upstream_model or name,
            kind=m.kind,
            max_output_tokens=(m.max_output_tokens or 0) if m.kind in ("chat", "completion") else 0,
            price=price,
            cost=cost,
            cost_divisor=divisor,
            aliases=tuple(m.aliases),
            inputs=m.inputs,
            service_tiers=dict(m.service_tiers),
            image_prices=_image_prices(m),
            audio_min_bytes_per_second=dict(m.audio_files.min_bytes_per_second) if m.audio_files else {},
        )
        for alias in m.aliases:
            aliases.setdefault(alias, name)
    meters: dict[str, MeterPrice] = {}
    for name, meter in meter_specs.items():
        cost_usd, divisor, meter_issues = _meter_cost(path, document, name, meter.cost)
        issues += meter_issues
        cost_micros = _micros_per_unit(cost_usd) if divisor == ONE else _micros_per_unit(meter.price)
        meters[name] = MeterPrice(
            name=name, unit=meter.unit, price=_micros_per_unit(meter.price), cost=cost_micros, cost_divisor=divisor,
            included_quantity=meter.included.quantity if meter.included else ZERO,
            included_per=meter.included.per if meter.included else None,
        )
    if issues or spec is None:
        return None
    return RateCard(
        id=spec.id,
        version=spec.version,
        effective_from=spec.effective_from,
        source=str(path),
        models=models,
        meters=meters,
        currency=spec.currency,
        description=spec.description,
        _aliases=aliases,
        outcomes={name: OutcomePrice(name, _micros_per_unit(o.price), _micros_per_unit(o.cost))
                  for name, o in spec.outcomes.items()},
    )


def _raw_section(document: Any, key: str) -> dict[str, Any]:
    section = document.get(key) if isinstance(document, dict) else None
    return {k: v for k, v in section.items() if isinstance(k, str)} if isinstance(section, dict) else {}


def _read(path: Path) -> tuple[Any, list[SourceIssue]]:
    try:
        document = read_yaml(path, exact_numbers=True)
    except SourceError as exc:
        return None, exc.issues
    if not isinstance(document, dict):
        what = "empty" if document is None else f"a {type(document).__name__}"
        return None, [SourceIssue(str(path), 1, "-", f"must be a mapping of fields, the file is {what}")]
    return document, []


def _load_card_file(path: Path, upstreams: Collection[str] | None) -> tuple[RateCard | None, Any, list[SourceIssue]]:
    document, issues = _read(path)
    if issues:
        return None, None, issues
    spec: CardSpec | None = None
    try:
        spec = CardSpec.model_validate(document)
    except ValidationError as exc:
        issues = _validation_issues(path, document, exc)
    card = _build_card(path, document, spec, upstreams, issues)
    return card, document, issues


def is_tiers_file(path: Path) -> bool:
    return path.stem in TIERS_STEMS and path.suffix in CARD_SUFFIXES


def expand_paths(paths: Iterable[Path]) -> tuple[list[Path], list[Path], list[SourceIssue]]:
    """Split files and directories into (card files, tiers files, issues)."""
    cards: list[Path] = []
    tiers: list[Path] = []
    issues: list[SourceIssue] = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in CARD_SUFFIXES)
            if not any(not is_tiers_file(p) for p in found):
                issues.append(SourceIssue(str(path), 0, "-", "no rate cards (*.yaml) in this directory"))
        elif path.exists():
            found = [path]
        else:
            issues.append(SourceIssue(str(path), 0, "-", "no such file or directory"))
            continue
        for p in found:
            (tiers if is_tiers_file(p) else cards).append(p)
    return cards, tiers, issues


def load_rate_card_files(
    card_paths: Iterable[Path],
    tiers_paths: Iterable[Path] = (),
    *,
    upstreams: Collection[str] | None = None,
    assets: Collection[str] | None = None,
    issues: Iterable[SourceIssue] = (),
) -> RateCardSet:
    """Load cards and tiers files together, checking everything; raise RateCardError with every issue.

    `assets`: the assets the service defines (None: not checked). A card must
    price in one of them, every version of a card in the same one, and, with a
    tiers file, in one that some tier's card uses: a wallet's asset comes from its
    tier's card, so no wallet could pay by a card in an asset no tier has.
    """
    issues = list(issues)
    by_key: dict[tuple[str, int], tuple[RateCard, int]] = {}
    cards: dict[str, list[RateCard]] = {}
    attempted_ids: set[str] = set()
    asset_at: dict[tuple[str, int], SourceIssue] = {}  # where each card names its asset, for the checks below
    for path in card_paths:
        card, document, file_issues = _load_card_file(Path(path), upstreams)
        issues += file_issues
        if isinstance(document, dict) and isinstance(document.get("id"), str):
            attempted_ids.add(document["id"])
        if card is None:
            continue
        field_name = "asset" if isinstance(document, dict) and "asset" in document else "currency"
        asset_at[(card.id, card.version)] = _issue(Path(path), document, [field_name], "")
        if assets is not None and card.currency not in assets:
            known = ", ".join(sorted(assets))
            issues.append(_issue(Path(path), document, [field_name],
                                 f"asset {card.currency!r} is not defined in the config's `assets` (defined: {known})"))
        key = (card.id, card.version)
        if key in by_key:
            first, first_line = by_key[key]
            issues.append(
                _issue(
                    Path(path), document, ["version"],
                    f"card {card.id!r} version {card.version} is already defined in {first.source}:{first_line}",
                )
            )
            continue
        by_key[key] = (card, line_of(document, ["version"]))
        cards.setdefault(card.id, []).append(card)

    tiers: dict[str, str] = {}
    clamp: dict[str, int] = {}
    tiers_paths = list(tiers_paths)
    known_ids = {card_id for card_id, _ in by_key}
    # A card that failed to load is still "known" for tier checks: one error, not two.
    known_ids |= attempted_ids
    for path in tiers_paths:
        document, file_issues = _read(Path(path))
        issues += file_issues
        if document is None:
            continue
        try:
            spec = TiersSpec.model_validate(document)
        except ValidationError as exc:
            issues += _validation_issues(Path(path), document, exc)
            continue
        for tier, card_id in spec.tiers.items():
            if card_id not in known_ids:
                known = ", ".join(sorted(known_ids)) or "none loaded"
                issues.append(_issue(Path(path), document, ["tiers", tier], f"tier {tier!r} names unknown card {card_id!r} (known: {known})"))
            elif tier in tiers and tiers[tier] != card_id:
                issues.append(_issue(Path(path), document, ["tiers", tier], f"tier {tier!r} is already mapped to {tiers[tier]!r}"))
            else:
                tiers[tier] = card_id
        for tier, tokens in spec.clamp_min_output_tokens.items():
            if tier not in spec.tiers:
                issues.append(_issue(Path(path), document, ["clamp_min_output_tokens", tier], f"tier {tier!r} is not in `tiers`"))
            else:
                clamp[tier] = tokens
    issues += _asset_issues(cards, tiers if tiers_paths else None, asset_at)
    if issues:
        raise RateCardError(sorted(issues, key=lambda i: (i.file, i.line)))
    if not tiers_paths:
        tiers = {card_id: card_id for card_id in cards}
    ordered = {card_id: tuple(sorted(versions, key=lambda c: c.version)) for card_id, versions in sorted(cards.items())}
    return RateCardSet(cards=ordered, tiers=tiers, clamp_min_output_tokens=clamp)


def _asset_issues(cards: dict[str, list[RateCard]], tiers: dict[str, str] | None,
                  asset_at: dict[tuple[str, int], SourceIssue]) -> list[SourceIssue]:
    """Every version of a card in one asset; with tiers, no card in an asset no tier's card uses."""
    def at(card: RateCard, message: str) -> SourceIssue:
        where = asset_at[(card.id, card.version)]
        return SourceIssue(where.file, where.line, where.field, message)

    issues = []
    for versions in cards.values():
        first = min(versions, key=lambda c: c.version)
        issues += [at(c, f"card {c.id!r} version {c.version} prices in {c.currency!r} but version {first.version} in "
                         f"{first.currency!r}: wallets on it would change asset") for c in versions if c.currency != first.currency]
    if tiers is not None:
        tier_assets = {c.currency for card_id in tiers.values() for c in cards.get(card_id, ())}
        for card_id, versions in cards.items():
            if card_id in tiers.values():
                continue
            for card in versions:
                if card.currency not in tier_assets:
                    issues.append(at(card, f"card {card.id!r} prices in {card.currency!r}, which no tier's card uses: "
                                           "no wallet could pay by it (a wallet's asset comes from its tier's card)"))
    return issues


def load_rate_cards(directory: Path, *, upstreams: Collection[str] | None = None,
                    assets: Collection[str] | None = None) -> RateCardSet:
    """Every card (*.yaml) in `directory` plus its `tiers.yaml`.

    Without a tiers file each card id is also a tier of the same name.
    `upstreams`: the upstream names a card may use (None: not checked).
    Raises RateCardError listing every issue in every file.
    """
    card_paths, tiers_paths, issues = expand_paths([Path(directory)])
    if Path(directory).exists() and not Path(directory).is_dir():
        issues.append(SourceIssue(str(directory), 0, "-", "not a directory"))
    return load_rate_card_files(card_paths, tiers_paths, upstreams=upstreams, assets=assets, issues=issues)


def load_rate_card(path: Path, *, upstreams: Collection[str] | None = None) -> RateCard:
    """One card file on its own (for `ratecard quote`/`diff`)."""
    card, _, issues = _load_card_file(Path(path), upstreams)
    if issues or card is None:
        raise RateCardError(sorted(issues, key=lambda i: (i.file, i.line)))
    return card
