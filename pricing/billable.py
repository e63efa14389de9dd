"""Request fields that change what a provider bills, and what a card makes of them.

One list (`BILLABLE_FIELDS`) of the fields known to change the bill, each with
how metergate handles it: priced by the card, refused (400) unless the card
prices it, or passed through with a price the card cannot express. The proxy
reads a request's billable fields with `billables()` before anything is held;
`metergate ratecard check` warns, per model, about every field the card cannot
price.

Service tiers: a request's `service_tier` picks a multiplier of the model's
token prices from the card's `service_tiers`. Absent, `default` and `auto`
mean the card's `default` (1x unless listed); `auto` is priced as the card's
`auto` entry when it has one (for an operator whose provider project runs
`auto` as priority). Any other tier the card does not list is refused.

Built-in tools: `web_search_options` (chat) and `tools` entries of a type
other than `function`/`custom` are tools the provider bills per call. Each is
named as the card names it (`web_search` for every web search variant, else
the type itself) and refused unless the card prices it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pricing.cards import ModelPrice
from pricing.values import value

WEB_SEARCH = "web_search"
# Tool types the provider bills as tokens only.
TOKEN_TOOL_TYPES = frozenset({"function", "custom"})
# Responses-style `output` items that are one billed call of a built-in tool.
OUTPUT_ITEM_TOOLS: Mapping[str, str] = {
    "web_search_call": WEB_SEARCH,
    "file_search_call": "file_search",
    "code_interpreter_call": "code_interpreter",
    "image_generation_call": "image_generation",
    "computer_call": "computer_use_preview",
    "mcp_call": "mcp",
    "local_shell_call": "local_shell",
}


class Unpriced(Exception):
    """A request asks for something billable that the card does not price: a 400."""

    def __init__(self, message: str, *, code: str, param: str) -> None:
        super().__init__(message)
        self.message, self.code, self.param = message, code, param


@dataclass(frozen=True)
class BillableField:
    name: str  # the request field (or field[selector])
    kinds: frozenset[str]  # model kinds whose endpoints take it
    bills: str  # how it changes the bill
    priced: Callable[[ModelPrice], bool]  # whether this model's card prices it
    when_unpriced: Literal["refused", "passed"]  # what the proxy does when the card cannot price it

    def applies_to(self, model: ModelPrice) -> bool:
        return model.kind in self.kinds


def _always(model: ModelPrice) -> bool:
    return True


def _never(model: ModelPrice) -> bool:
    return False


def _has_tiers(model: ModelPrice) -> bool:
    return any(tier != "default" for tier in model.service_tiers)


def _prices_web_search(model: ModelPrice) -> bool:
    return WEB_SEARCH in model.price.tools


def _prices_other_tools(model: ModelPrice) -> bool:
    return any(tool != WEB_SEARCH for tool in model.price.tools)


_GENERATING = frozenset({"chat", "completion"})
_CHAT = frozenset({"chat"})

BILLABLE_FIELDS: tuple[BillableField, ...] = (
    BillableField("service_tier", _GENERATING, "flex/priority tiers bill the token prices times a factor",
                  _has_tiers, "refused"),
    BillableField("n", _GENERATING, "every choice is billed: the output bound is multiplied", _always, "passed"),
    BillableField("best_of", frozenset({"completion"}), "every candidate is billed: the output bound is multiplied",
                  _always, "passed"),
    BillableField("web_search_options / tools[type=web_search*]", _CHAT,
                  "web search calls billed per call (chat: one per choice)", _prices_web_search, "refused"),
    BillableField("tools[type=file_search|code_interpreter|...]", _CHAT, "other built-in tools billed per call",
                  _prices_other_tools, "refused"),
    BillableField("audio / modalities", _CHAT,
                  "audio output tokens, which the card can only charge at its text output price", _never, "passed"),
    BillableField("prediction", _CHAT, "rejected prediction tokens are billed as output (settled from usage)",
                  _always, "passed"),
    BillableField("reasoning_effort", _CHAT, "reasoning tokens (the card's reasoning price, within the output bound)",
                  _always, "passed"),
)


def unpriced_fields(model: ModelPrice) -> list[BillableField]:
    """The billable fields this model's card cannot price, in list order."""
    return [f for f in BILLABLE_FIELDS if f.applies_to(model) and not f.priced(model)]


# ------------------------------------------------------------- one request


@value
class Billables:
    """A request's billable fields, checked against its model's card."""

    service_tier: str  # the card's tier the call is priced at
    model: ModelPrice  # the model's prices at that tier
    tools: tuple[str, ...] = ()  # built-in tools the request enables, as the card names them
    choices: int = 1  # choices the provider generates (and bills a web search for, each)
    held_tool_calls: Mapping[str, int] = field(default_factory=dict)  # tool calls the hold covers
    # Chat's `web_search_options`: the provider bills one search per choice it returns.
    web_search_per_choice: bool = False


def _tier(model: ModelPrice, requested: Any) -> tuple[str, ModelPrice]:
    if requested is not None and not isinstance(requested, str):
        raise Unpriced("`service_tier` must be a string", code="invalid_request", param="service_tier")
    name = requested or "default"
    if name == "auto" and "auto" not in model.service_tiers:
        name = "default"
    try:
        return name, model.at_service_tier(name)
    except KeyError:
        offered = ", ".join(sorted({"default", *model.service_tiers})) or "default"
        raise Unpriced(
            f"`service_tier` {requested!r} is not offered for `{model.name}` (offered: {offered})",
            code="unsupported_service_tier", param="service_tier",
        ) from None


def builtin_tools(body: Mapping[str, Any]) -> dict[str, str]:
    """Built-in tools a request enables: the card's tool name -> the request field that enables it."""
    found: dict[str, str] = {}
    if body.get("web_search_options") is not None:
        found[WEB_SEARCH] = "web_search_options"
    tools = body.get("tools")
    for tool in tools if isinstance(tools, list) else ():
        kind = tool.get("type") if isinstance(tool, Mapping) else None
        if not isinstance(kind, str) or kind in TOKEN_TOOL_TYPES:
            continue
        found.setdefault(WEB_SEARCH if kind.startswith(WEB_SEARCH) else kind, "tools")
    return found


def _choices(body: Mapping[str, Any]) -> int:
    n = body.get("n")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1


def billables(model: ModelPrice, body: Mapping[str, Any]) -> Billables:
    """Check a request's billable fields against `model`'s card; `Unpriced` for what it cannot price.

    Cheap (no tokenizing): it runs before anything else is counted or held.
    """
    tier, priced = _tier(model, body.get("service_tier"))
    tools = builtin_tools(body)
    for tool, param in tools.items():
        if tool not in priced.price.tools:
            raise Unpriced(
                f"the built-in tool `{tool}` is not offered for `{model.name}`: its calls cannot be priced",
                code="unsupported_tool", param=param,
            )
    choices = _choices(body)
    # One call per choice is what chat's web search bills; a Responses-style
    # tool may be called more often, and is settled for what the answer shows.
    held = {tool: choices for tool in tools}
    return Billables(tier, priced, tuple(tools), choices, held, tools.get(WEB_SEARCH) == "web_search_options")
