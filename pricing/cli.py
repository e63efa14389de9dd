"""`metergate ratecard check|quote|diff`: what operators run before publishing a card."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from decimal import Decimal
from pathlib import Path

from pricing.billable import unpriced_fields
from pricing.cards import (
    ModelPrice,
    RateCard,
    RateCardError,
    expand_paths,
    load_rate_card,
    load_rate_card_files,
)
from pricing.money import MICROS_PER_UNIT, Usage, format_micros, price_usage
from pricing.yaml_source import SourceError, read_yaml

# (component, attribute on Rates, is a per-token price)
COMPONENTS: list[tuple[str, str, bool]] = [
    ("input", "input", True),
    ("cached_input", "effective_cached_input", True),
    ("output", "output", True),
    ("reasoning", "effective_reasoning", True),
    ("per_request", "per_request", False),
    ("per_image", "per_image", False),
    ("per_audio_second", "per_audio_second", False),
    ("per_audio_minute", "per_audio_minute", False),
]


_ORDER = [c for c, _, _ in COMPONENTS]


def _rank(component: str) -> tuple[int, str]:
    """Components in COMPONENTS order, anything else after them by name."""
    return (_ORDER.index(component) if component in _ORDER else len(_ORDER), component)


def _print_issues(issues: Iterable[object]) -> int:
    issues = list(issues)
    for issue in issues:
        print(issue)
    files = {getattr(i, "file", "") for i in issues}
    print(f"{len(issues)} problem{'s' if len(issues) != 1 else ''} in {len(files)} file{'s' if len(files) != 1 else ''}", file=sys.stderr)
    return 1


def _upstreams(args: argparse.Namespace) -> set[str] | None:
    if args.upstreams is not None:
        return {u.strip() for u in args.upstreams.split(",") if u.strip()}
    if args.config:
        document = read_yaml(Path(args.config))
        section = document.get("upstreams") if isinstance(document, dict) else None
        return set(section) if isinstance(section, dict) else set()
    return None


def _assets(args: argparse.Namespace) -> set[str] | None:
    """The assets the config defines (USD always), when a config is given."""
    if not args.config:
        return None
    document = read_yaml(Path(args.config))
    section = document.get("assets") if isinstance(document, dict) else None
    return {"USD", *(section if isinstance(section, dict) else ())}


def _check(args: argparse.Namespace) -> int:
    try:
        upstreams = _upstreams(args)
        assets = _assets(args)
    except SourceError as exc:
        return _print_issues(exc.issues)
    card_paths, tiers_paths, issues = expand_paths(Path(p) for p in args.paths)
    try:
        cards = load_rate_card_files(card_paths, tiers_paths, upstreams=upstreams, assets=assets, issues=issues)
    except RateCardError as exc:
        return _print_issues(exc.issues)
    for card in sorted(cards.all_cards(), key=lambda c: (c.id, c.version)):
        meters = f", {len(card.meters)} meter{'s' if len(card.meters) != 1 else ''}" if card.meters else ""
        print(
            f"ok {card.ref}: {len(card.models)} model{'s' if len(card.models) != 1 else ''}{meters}, "
            f"{card.currency}, effective {card.effective_from.isoformat()} ({card.source})"
        )
    if tiers_paths:
        print("tiers: " + ", ".join(f"{tier} -> {card_id}" for tier, card_id in sorted(cards.tiers.items())))
    for line in billable_warnings(cards.all_cards()):
        print(line, file=sys.stderr)
    if upstreams is None:
        print("note: upstream names not checked (pass --config metergate.yaml or --upstreams)", file=sys.stderr)
    if assets is None:
        print("note: assets not checked against the config's `assets` (pass --config metergate.yaml)", file=sys.stderr)
    return 0


def billable_warnings(cards: Iterable[RateCard]) -> list[str]:
    """Per model, the request fields known to change the bill that its card cannot price:
    those the proxy refuses (400), and those it must pass through at a price the card cannot set."""
    lines = []
    for card in sorted(cards, key=lambda c: (c.id, c.version)):
        for name, model in sorted(card.models.items()):
            fields = unpriced_fields(model)
            refused = [f.name for f in fields if f.when_unpriced == "refused"]
            passed = [f"{f.name} ({f.bills})" for f in fields if f.when_unpriced == "passed"]
            if refused:
                lines.append(f"warning: {card.ref} {name}: not priced, requests using them are refused (400): "
                             + ", ".join(refused))
            if passed:
                lines.append(f"warning: {card.ref} {name}: not priced, passed through: " + "; ".join(passed))
    return lines


def _model_or_exit(card: RateCard, name: str) -> ModelPrice:
    model = card.model(name)
    if model is None:
        known = ", ".join(sorted(card.models))
        raise SystemExit(f"metergate ratecard: no model {name!r} on card {card.ref} (models: {known})")
    return model


def _percent(part: int, whole: int) -> str:
    if whole == 0:
        return "n/a"
    return f"{(Decimal(part) * 100 / Decimal(whole)).quantize(Decimal('0.01'))}%"


def _quote(args: argparse.Namespace) -> int:
    try:
        card = load_rate_card(Path(args.card))
    except RateCardError as exc:
        return _print_issues(exc.issues)
    model = _model_or_exit(card, args.model)
    tools: dict[str, int] = {}
    for item in args.tool or []:
        name, _, count = item.partition("=")
        if not name or not count.isdigit():
            raise SystemExit(f"metergate ratecard: --tool expects NAME=COUNT, got {item!r}")
        tools[name] = tools.get(name, 0) + int(count)
    usage = Usage(
        prompt_tokens=args.input_tokens,
        completion_tokens=args.output_tokens,
        cached_tokens=args.cached_tokens,
        reasoning_tokens=args.reasoning_tokens,
        tool_calls=tools,
        requests=args.requests,
    )
    charge = price_usage(model, usage)
    currency = card.currency
    print(f"card: {card.ref} ({card.source})")
    print(f"model: {model.name} ({model.kind}, upstream {model.upstream}/{model.upstream_model})")
    print(
        f"usage: {usage.prompt_tokens} input tokens ({usage.cached_tokens} cached), "
        f"{usage.completion_tokens} output tokens ({usage.reasoning_tokens} reasoning)"
        + (", tools " + ", ".join(f"{k}={v}" for k, v in tools.items()) if tools else "")
    )
    print(f"charge: {charge.price_micros} micros ({format_micros(charge.price_micros, currency)})")
    print(f"cost: {charge.cost_micros} micros ({format_micros(charge.cost_micros, currency)})")
    print(
        f"margin: {charge.margin_micros} micros ({format_micros(charge.margin_micros, currency)}, "
        f"{_percent(charge.margin_micros, charge.price_micros)} of charge)"
    )
    return 0


def _usd(micros: Decimal, per_token: bool) -> Decimal:
    # Back to the units the card is written in: USD per 1M tokens, or USD per unit.
    return micros if per_token else micros / MICROS_PER_UNIT


def _fmt(value: Decimal) -> str:
    text = f"{value.normalize():f}" if value == value.to_integral_value() else f"{value:f}".rstrip("0")
    return text.rstrip(".") if "." in text else text


def _components(model: ModelPrice) -> dict[str, Decimal]:
    """Effective prices as written in the card; cached_input/reasoning only when set."""
    values = {name: _usd(getattr(model.price, attr), per_token) for name, attr, per_token in COMPONENTS}
    if model.price.cached_input is None:
        values["~cached_input"] = values.pop("cached_input")
    if model.price.reasoning is None:
        values["~reasoning"] = values.pop("reasoning")
    for tool, micros in model.price.tools.items():
        values[f"tools.{tool}"] = _usd(micros, False)
    return values


def _change(old: Decimal, new: Decimal) -> str:
    delta = new - old
    sign = "+" if delta > 0 else ""
    if old == 0:
        pct = "new charge"
    else:
        pct = f"{sign}{(delta * 100 / old).quantize(Decimal('0.01'))}%"
    return f"{_fmt(old)} -> {_fmt(new)} ({sign}{_fmt(delta)}, {pct})"


def diff_cards(old: RateCard, new: RateCard) -> list[str]:
    lines = [f"--- {old.ref} ({old.source})", f"+++ {new.ref} ({new.source})"]
    if old.effective_from != new.effective_from:
        lines.append(f"effective_from: {old.effective_from.isoformat()} -> {new.effective_from.isoformat()}")
    for name in sorted(set(old.models) - set(new.models)):
        lines.append(f"removed model {name}")
    for name in sorted(set(new.models) - set(old.models)):
        m = new.models[name]
        lines.append(f"added model {name} ({m.kind}): input {_fmt(m.price.input)}, output {_fmt(m.price.output)} USD/1M tokens")
    for name in sorted(set(old.models) & set(new.models)):
        before, after = _components(old.models[name]), _components(new.models[name])
        for derived in ("cached_input", "reasoning"):
            # A price that follows input/output is shown only when one side sets it.
            if derived in before or derived in after:
                before[derived] = before.pop(derived, before.pop("~" + derived, Decimal(0)))
                after[derived] = after.pop(derived, after.pop("~" + derived, Decimal(0)))
            before.pop("~" + derived, None)
            after.pop("~" + derived, None)
        for component in sorted([c for c in after if c in before] + [c for c in before if c not in after], key=_rank):
            was, now = before.get(component, Decimal(0)), after.get(component, Decimal(0))
            if was != now:
                unit = "USD/1M tokens" if any(c == component and t for c, _, t in COMPONENTS) else "USD/unit"
                lines.append(f"{name} {component}: {_change(was, now)} {unit}")
        for component in [c for c in after if c not in before]:
            if after[component] != 0:
                lines.append(f"{name} {component}: {_change(Decimal(0), after[component])} USD/unit")
    for name in sorted(set(old.meters) - set(new.meters)):
        lines.append(f"removed meter {name}")
    for name in sorted(set(new.meters) - set(old.meters)):
        lines.append(f"added meter {name}: {_fmt(new.meters[name].price / MICROS_PER_UNIT)} USD/{new.meters[name].unit}")
    for name in sorted(set(old.meters) & set(new.meters)):
        was, now = old.meters[name].price / MICROS_PER_UNIT, new.meters[name].price / MICROS_PER_UNIT
        if was != now:
            lines.append(f"meter {name}: {_change(was, now)} USD/{new.meters[name].unit}")
    if len(lines) == 2 + (old.effective_from != new.effective_from):
        lines.append("no price changes")
    return lines


def _diff(args: argparse.Namespace) -> int:
    issues = []
    loaded: list[RateCard] = []
    for path in (args.old, args.new):
        try:
            loaded.append(load_rate_card(Path(path)))
        except RateCardError as exc:
            issues += exc.issues
    if issues:
        return _print_issues(issues)
    for line in diff_cards(*loaded):
        print(line)
    return 0


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metergate ratecard", description="Check, quote and diff rate cards.")
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser("check", help="validate rate card files or directories")
    check.add_argument("paths", nargs="+", metavar="PATH", help="card files, tiers.yaml, or directories of them")
    check.add_argument("--config", help="metergate.yaml whose upstream names and assets the cards must use")
    check.add_argument("--upstreams", help="comma-separated upstream names the cards must use")
    check.set_defaults(run=_check)

    quote = commands.add_parser("quote", help="price one call on a card")
    quote.add_argument("--card", required=True, help="a rate card file")
    quote.add_argument("--model", required=True, help="model name or alias")
    quote.add_argument("--input-tokens", type=_non_negative, required=True)
    quote.add_argument("--output-tokens", type=_non_negative, required=True)
    quote.add_argument("--cached-tokens", type=_non_negative, default=0, help="part of the input tokens read from cache")
    quote.add_argument("--reasoning-tokens", type=_non_negative, default=0, help="part of the output tokens spent reasoning")
    quote.add_argument("--requests", type=_non_negative, default=1)
    quote.add_argument("--tool", action="append", metavar="NAME=COUNT", help="tool calls, e.g. web_search=2")
    quote.set_defaults(run=_quote)

    diff = commands.add_parser("diff", help="price changes between two versions of a card")
    diff.add_argument("old")
    diff.add_argument("new")
    diff.set_defaults(run=_diff)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    return args.run(args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
