"""The pure rules that turn a wallet's ledger entries into events.

Owns `WalletEventState` (where a wallet's derivation stands: its cursor, the base
of its percentage thresholds, the thresholds fired and not yet re-armed, and the
wallet's own alerts) and `derive`, which maps entries plus a state to events plus
the next state. No I/O: the consumer reads the entries and the state, calls
`derive`, and stores the events and the new state in one step, so deriving the
same entries again (after a crash) gives the same events with the same ids.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from proxy.config import LowBalanceAlerts
from proxy.events.model import Event, derived_event_id
from proxy.store.wallets import LedgerEntry

# Ledger notes (amount 0) that become one event each, and the event type they become.
_NOTE_EVENTS = {
    "depleted": "wallet.depleted",
    "spend_cap_reached": "key.spend_cap_reached",
    "auto_top_up_failed": "auto_top_up.failed",
    "auto_top_up_disabled": "auto_top_up.disabled",
    "top_up_failed": "top_up.failed",
}


@dataclass(frozen=True)
class WalletEventState:
    """A wallet's derivation state, kept in its events hash (all values strings there)."""

    cursor: str = "0"  # id of the last ledger entry derived ("0": none yet)
    last_top_up_micros: int = 0  # the amount of the latest top_up entry (base of percentage thresholds)
    fired: frozenset[str] = frozenset()  # thresholds fired and not re-armed since: "abs:<micros>" / "pct:<n>"
    alerts: LowBalanceAlerts | None = None  # the wallet's own alerts (set by the admin API); None: its tier's

    def to_fields(self) -> dict[str, str]:
        # Every field is written (alerts "" for none), so writing the whole mapping
        # replaces the previous state rather than merging with it.
        return {
            "cursor": self.cursor,
            "last_top_up_micros": str(self.last_top_up_micros),
            "fired": ",".join(sorted(self.fired)),
            "alerts": self.alerts.model_dump_json() if self.alerts is not None else "",
        }

    @classmethod
    def from_fields(cls, fields: Mapping[str, str]) -> WalletEventState:
        """The state in `fields`; a missing or empty field takes its default (a new wallet's hash is empty)."""
        alerts = fields.get("alerts") or ""
        return cls(
            cursor=fields.get("cursor") or "0",
            last_top_up_micros=int(fields.get("last_top_up_micros") or 0),
            fired=frozenset(k for k in (fields.get("fired") or "").split(",") if k),
            alerts=LowBalanceAlerts.model_validate_json(alerts) if alerts else None,
        )


def alerts_in_force(state: WalletEventState, tier_alerts: LowBalanceAlerts) -> LowBalanceAlerts:
    """The alerts that apply to a wallet: its own when the admin API set them, else its tier's."""
    return state.alerts if state.alerts is not None else tier_alerts


def entry_id_key(entry_id: str) -> tuple[int, int]:
    """A stream id ("ms-seq", or "0") as a tuple that sorts in ledger order."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def threshold_micros(key: str, last_top_up_micros: int) -> int:
    """What a threshold key is worth now: its micros ("abs:…") or its percentage of the last top-up ("pct:…")."""
    kind, _, value = key.partition(":")
    if kind == "pct":
        return int(value) * last_top_up_micros // 100
    return int(value)


def _thresholds(alerts: LowBalanceAlerts, last_top_up_micros: int) -> list[tuple[int, str]]:
    """(micros, key) of every threshold that applies, highest first. A percentage has
    no base before the first top-up, so none applies then."""
    keys = {f"abs:{m}" for m in alerts.absolute_micros}
    if last_top_up_micros > 0:
        keys |= {f"pct:{p}" for p in alerts.percent_of_last_top_up}
    return sorted(((threshold_micros(k, last_top_up_micros), k) for k in keys), key=lambda t: (-t[0], t[1]))


def _int_or_none(value: Any) -> int | None:
    return int(value) if value is not None and value != "" else None


def _balance_low(wallet_id: str, entry: LedgerEntry, available: int, created: int,
                 thresholds: list[tuple[int, str]], fired: set[str]) -> list[Event]:
    """One `wallet.balance_low` per threshold `available` is below and that has not fired (added to `fired`)."""
    events = []
    for value, key in thresholds:
        if key not in fired and available < value:
            fired.add(key)
            events.append(Event(
                id=derived_event_id(wallet_id, entry.id, "wallet.balance_low", key), type="wallet.balance_low",
                created=created, end_user=wallet_id, ledger_id=entry.id,
                data={"threshold": key, "threshold_micros": value, "available_micros": available,
                      "balance_micros": entry.balance_micros, "held_micros": entry.held_micros},
            ))
    return events


def derive(
    wallet_id: str, entries: Sequence[LedgerEntry], state: WalletEventState, alerts: LowBalanceAlerts,
    credit_limit_micros: int,
) -> tuple[list[Event], WalletEventState]:
    """The events `entries` (ledger order, all after state.cursor) produce, and the state after them.

    `alerts` is what applies (the wallet's own, or its tier's). Entries at or before
    the cursor are skipped, so an overlapping read cannot derive an entry twice.
    """
    events: list[Event] = []
    cursor, last_top_up, fired = state.cursor, state.last_top_up_micros, set(state.fired)
    cursor_key = entry_id_key(cursor)
    # Every charge is checked against the thresholds; they change only with the last
    # top-up, so they are worked out again only then (a batch is mostly charges).
    thresholds = _thresholds(alerts, last_top_up)
    for entry in entries:
        entry_key = entry_id_key(entry.id)
        if entry_key <= cursor_key:
            continue
        cursor, cursor_key = entry.id, entry_key
        d = entry.details
        available = entry.balance_micros - entry.held_micros + credit_limit_micros
        created = entry_key[0] // 1000

        def emit(event_type: str, data: dict[str, Any], discriminator: str = "", entry: LedgerEntry = entry,
                 created: int = created) -> None:
            events.append(Event(
                id=derived_event_id(wallet_id, entry.id, event_type, discriminator), type=event_type, created=created,
                data=data, end_user=wallet_id, ledger_id=entry.id,
            ))

        if entry.type == "top_up":
            if entry.amount_micros != last_top_up:
                thresholds = _thresholds(alerts, entry.amount_micros)
            last_top_up = entry.amount_micros
            data: dict[str, Any] = {"amount_micros": entry.amount_micros, "balance_micros": entry.balance_micros,
                                    "available_micros": available}
            for name in ("reference", "source"):
                if d.get(name):
                    data[name] = d[name]
            emit("wallet.topped_up", data)
            if d.get("kind") == "auto_top_up":
                emit("auto_top_up.succeeded", {"amount_micros": entry.amount_micros, "payment_intent": d.get("reference")})

        if entry.type == "charge" and (d.get("shortfall_micros") or 0) > 0:
            emit("charge.shortfall", {
                "hold_id": d.get("hold_id"), "request_id": d.get("request_id"), "model": d.get("model"),
                "requested_micros": d.get("requested_micros"), "captured_micros": -entry.amount_micros,
                "shortfall_micros": d["shortfall_micros"],
            })

        if (entry.type == "charge" and d.get("outcome") == "proxy_lost") or entry.type == "expire":
            captured = -entry.amount_micros
            data = {"hold_id": d.get("hold_id"), "captured_micros": captured}
            if d.get("held_delta_micros") is not None:
                # The whole hold closed (held_delta is minus its amount); what was not captured went back.
                data["released_micros"] = max(-d["held_delta_micros"] - captured, 0)
            data["request_id"] = d.get("request_id")
            emit("hold.expired", data)

        if entry.type == "depleted":
            # Concurrent calls can hold the last funds and be refused before any of them is
            # charged: the thresholds that available (holds counted) is already below are
            # reported before the wallet is said to be depleted, never after.
            events.extend(_balance_low(wallet_id, entry, available, created, thresholds, fired))

        if entry.type in _NOTE_EVENTS:
            event_type = _NOTE_EVENTS[entry.type]
            if entry.type == "depleted":
                data = {"reason": d.get("reason"), "available_micros": available, "balance_micros": entry.balance_micros}
            elif entry.type == "spend_cap_reached":
                data = {"key_id": d.get("key_id"), "period": d.get("period"), "cap_micros": _int_or_none(d.get("cap_micros"))}
            elif entry.type == "auto_top_up_failed":
                data = {"reason": d.get("reason"), "attempt": _int_or_none(d.get("attempt")),
                        "consecutive_failures": _int_or_none(d.get("failures"))}
            elif entry.type == "auto_top_up_disabled":
                data = {"reason": d.get("reason")}
            else:  # top_up_failed
                data = {"payment_intent": d.get("payment_intent"), "reason": d.get("reason")}
            emit(event_type, data)

        if entry.amount_micros > 0:
            # A credit re-arms what it lifted available back to (after a top-up, against its new base).
            fired = {k for k in fired if threshold_micros(k, last_top_up) > available}
        elif entry.amount_micros < 0:
            events.extend(_balance_low(wallet_id, entry, available, created, thresholds, fired))

    return events, replace(state, cursor=cursor, last_top_up_micros=last_top_up, fired=frozenset(fired))
