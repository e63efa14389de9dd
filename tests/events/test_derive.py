"""`derive`: the events a wallet's ledger entries produce, thresholds and their state included (pure; no Redis)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import LowBalanceAlerts
from proxy.events.derive import WalletEventState, alerts_in_force, derive
from proxy.events.model import Event, derived_event_id
from proxy.store.wallets import LedgerEntry

USD = 1_000_000
WALLET = "user-1"
PERCENTS = LowBalanceAlerts(absolute_micros=[], percent_of_last_top_up=[50, 20, 10])
NO_ALERTS = LowBalanceAlerts(absolute_micros=[], percent_of_last_top_up=[])
START_MS = 1_700_000_000_000


@dataclass
class Ledger:
    """Builds a wallet's ledger entries by hand, keeping balance and held as the scripts do."""

    balance: int = 0
    held: int = 0
    ms: int = START_MS
    entries: list[LedgerEntry] = field(default_factory=list)

    def _add(self, type_: str, amount: int = 0, **details: Any) -> LedgerEntry:
        self.ms += 250
        self.balance += amount
        entry = LedgerEntry(id=f"{self.ms}-0", type=type_, amount_micros=amount, balance_micros=self.balance,
                            held_micros=self.held, details=details)
        self.entries.append(entry)
        return entry

    def top_up(self, amount: int, **details: Any) -> LedgerEntry:
        return self._add("top_up", amount, **details)

    def hold(self, amount: int, hold_id: str = "hold_1") -> LedgerEntry:
        self.held += amount
        return self._add("hold", 0, hold_id=hold_id, held_delta_micros=amount)

    def charge(self, captured: int, *, held: int | None = None, shortfall: int = 0, outcome: str = "completed",
               hold_id: str = "hold_1", request_id: str = "req_1") -> LedgerEntry:
        """Settle a hold of `held` (default: what is captured) by capturing `captured`."""
        hold = captured if held is None else held
        self.held -= hold
        return self._add("charge", -captured, hold_id=hold_id, requested_micros=captured + shortfall,
                         shortfall_micros=shortfall, held_delta_micros=-hold, request_id=request_id, model="gpt-x",
                         outcome=outcome)

    def note(self, type_: str, **details: Any) -> LedgerEntry:
        return self._add(type_, 0, **details)

    def other(self, type_: str, amount: int, **details: Any) -> LedgerEntry:
        return self._add(type_, amount, **details)


def run(ledger: Ledger, alerts: LowBalanceAlerts = NO_ALERTS, state: WalletEventState | None = None,
        credit_limit: int = 0) -> tuple[list[Event], WalletEventState]:
    return derive(WALLET, ledger.entries, state or WalletEventState(), alerts, credit_limit)


def of_type(events: list[Event], event_type: str) -> list[Event]:
    return [e for e in events if e.type == event_type]


# -- each event type


def test_a_top_up_becomes_wallet_topped_up() -> None:
    ledger = Ledger()
    ledger.top_up(10 * USD, reference="admin-7")
    events, state = run(ledger, credit_limit=2 * USD)
    assert [(e.type, e.data) for e in events] == [
        ("wallet.topped_up", {"amount_micros": 10 * USD, "balance_micros": 10 * USD, "available_micros": 12 * USD,
                              "reference": "admin-7"}),
    ]
    assert state.last_top_up_micros == 10 * USD


def test_an_auto_top_up_also_becomes_auto_top_up_succeeded() -> None:
    ledger = Ledger()
    ledger.top_up(5 * USD, reference="pi_1", source="stripe", kind="auto_top_up")
    events, _ = run(ledger)
    assert [e.type for e in events] == ["wallet.topped_up", "auto_top_up.succeeded"]
    assert events[0].data["source"] == "stripe"
    assert events[1].data == {"amount_micros": 5 * USD, "payment_intent": "pi_1"}


def test_a_checkout_top_up_is_not_an_auto_top_up_success() -> None:
    ledger = Ledger()
    ledger.top_up(5 * USD, reference="pi_1", source="stripe", kind="checkout")
    events, _ = run(ledger)
    assert [e.type for e in events] == ["wallet.topped_up"]


def test_a_charge_with_a_shortfall_becomes_charge_shortfall() -> None:
    ledger = Ledger()
    ledger.top_up(1 * USD)
    ledger.hold(1 * USD)
    ledger.charge(1 * USD, shortfall=300_000, hold_id="hold_9", request_id="req_9")
    events, _ = run(ledger)
    assert [e.data for e in of_type(events, "charge.shortfall")] == [
        {"hold_id": "hold_9", "request_id": "req_9", "model": "gpt-x", "requested_micros": 1_300_000,
         "captured_micros": 1 * USD, "shortfall_micros": 300_000},
    ]


def test_a_charge_captured_in_full_gives_no_event() -> None:
    ledger = Ledger()
    ledger.top_up(10 * USD)
    ledger.hold(1 * USD)
    ledger.charge(1 * USD)
    events, _ = run(ledger)
    assert [e.type for e in events] == ["wallet.topped_up"]


def test_a_charge_of_a_lost_proxy_becomes_hold_expired() -> None:
    ledger = Ledger()
    ledger.top_up(10 * USD)
    ledger.hold(2 * USD, hold_id="hold_5")
    ledger.charge(700_000, held=2 * USD, outcome="proxy_lost", hold_id="hold_5", request_id="req_5")
    events, _ = run(ledger)
    assert [e.data for e in of_type(events, "hold.expired")] == [
        {"hold_id": "hold_5", "captured_micros": 700_000, "released_micros": 1_300_000, "request_id": "req_5"},
    ]


def test_an_expire_entry_becomes_hold_expired_with_the_whole_hold_released() -> None:
    ledger = Ledger()
    ledger.top_up(10 * USD)
    ledger.hold(2 * USD, hold_id="hold_5")
    ledger.held -= 2 * USD
    ledger.note("expire", hold_id="hold_5", held_delta_micros=-2 * USD, reason="ttl passed")
    events, _ = run(ledger)
    assert [e.data for e in of_type(events, "hold.expired")] == [
        {"hold_id": "hold_5", "captured_micros": 0, "released_micros": 2 * USD, "request_id": None},
    ]


def test_a_depleted_note_becomes_wallet_depleted() -> None:
    ledger = Ledger()
    ledger.top_up(1 * USD)
    ledger.hold(800_000)
    ledger.note("depleted", reason="refused")
    events, _ = run(ledger, credit_limit=100_000)
    assert [e.data for e in of_type(events, "wallet.depleted")] == [
        {"reason": "refused", "available_micros": 300_000, "balance_micros": 1 * USD},
    ]


def test_a_spend_cap_note_becomes_key_spend_cap_reached() -> None:
    ledger = Ledger()
    ledger.note("spend_cap_reached", key_id="key_3", period="daily", cap_micros=5 * USD)
    events, _ = run(ledger)
    assert [(e.type, e.data) for e in events] == [
        ("key.spend_cap_reached", {"key_id": "key_3", "period": "daily", "cap_micros": 5 * USD}),
    ]


def test_an_auto_top_up_failure_note_becomes_auto_top_up_failed() -> None:
    ledger = Ledger()
    # As the Lua script writes them: attempt and failures are plain stream fields (text).
    ledger.note("auto_top_up_failed", reason="card_declined", attempt="4", failures="2")
    events, _ = run(ledger)
    assert [(e.type, e.data) for e in events] == [
        ("auto_top_up.failed", {"reason": "card_declined", "attempt": 4, "consecutive_failures": 2}),
    ]


def test_an_auto_top_up_disabled_note_becomes_auto_top_up_disabled() -> None:
    ledger = Ledger()
    ledger.note("auto_top_up_disabled", reason="3 consecutive auto top-up failures; last: card_declined")
    events, _ = run(ledger)
    assert [(e.type, e.data) for e in events] == [
        ("auto_top_up.disabled", {"reason": "3 consecutive auto top-up failures; last: card_declined"}),
    ]


def test_a_top_up_failed_note_becomes_top_up_failed() -> None:
    ledger = Ledger()
    ledger.note("top_up_failed", payment_intent="pi_8", reason="card_declined")
    events, _ = run(ledger)
    assert [(e.type, e.data) for e in events] == [("top_up.failed", {"payment_intent": "pi_8", "reason": "card_declined"})]


def test_every_event_carries_its_entry_wallet_time_and_derived_id() -> None:
    ledger = Ledger()
    entry = ledger.top_up(1 * USD)
    [event], _ = run(ledger)
    assert event.id == derived_event_id(WALLET, entry.id, "wallet.topped_up", "")
    assert event.created == int(entry.id.split("-")[0]) // 1000
    assert (event.end_user, event.ledger_id) == (WALLET, entry.id)


def test_other_entries_only_move_the_cursor() -> None:
    ledger = Ledger()
    ledger.note("open", credit_limit_micros=0)
    ledger.hold(0)
    last = ledger.note("release", hold_id="hold_1", held_delta_micros=0)
    events, state = run(ledger, PERCENTS)
    assert events == []
    assert state == WalletEventState(cursor=last.id)


# -- low-balance thresholds


def test_percentage_thresholds_fire_once_per_crossing_highest_first() -> None:
    ledger = Ledger()
    ledger.top_up(10 * USD)
    for _ in range(100):
        ledger.hold(100_000)
        ledger.charge(100_000)
    events, state = run(ledger, PERCENTS)
    low = of_type(events, "wallet.balance_low")
    assert [(e.data["threshold"], e.data["threshold_micros"], e.data["available_micros"]) for e in low] == [
        ("pct:50", 5 * USD, 4_900_000), ("pct:20", 2 * USD, 1_900_000), ("pct:10", 1 * USD, 900_000),
    ]
    assert state.fired == {"pct:50", "pct:20", "pct:10"}


def test_one_entry_crossing_two_thresholds_fires_both_highest_first() -> None:
    ledger = Ledger()
    ledger.top_up(10 * USD)
    ledger.hold(8_500_000)
    ledger.charge(8_500_000)  # 1.5 USD left: under 5 and 2 USD, not under 1 USD
    events, _ = run(ledger, PERCENTS)
    low = of_type(events, "wallet.balance_low")
    assert [e.data["threshold"] for e in low] == ["pct:50", "pct:20"]
    assert len({e.id for e in low}) == 2


def test_a_refusal_while_holds_take_the_funds_reports_the_crossed_thresholds_before_depleted() -> None:
    ledger = Ledger()
    ledger.top_up(10 * USD)
    ledger.hold(9_500_000, hold_id="hold_a")  # concurrent calls hold nearly everything, none charged yet
    ledger.note("depleted", reason="refused")
    ledger.charge(9_500_000, hold_id="hold_a")
    events, state = run(ledger, PERCENTS)
    assert [(e.type, e.data.get("threshold")) for e in events if e.type != "wallet.topped_up"] == [
        ("wallet.balance_low", "pct:50"), ("wallet.balance_low", "pct:20"), ("wallet.balance_low", "pct:10"),
        ("wallet.depleted", None),
    ]
    assert state.fired == {"pct:50", "pct:20", "pct:10"}


def test_a_hold_alone_fires_no_threshold() -> None:
    ledger = Ledger()
    ledger.top_up(10 * USD)
    ledger.hold(9_500_000)
    events, state = run(ledger, PERCENTS)
    assert of_type(events, "wallet.balance_low") == [] and state.fired == frozenset()


def test_a_top_up_rearms_a_threshold_which_then_fires_again() -> None:
    ledger = Ledger()
    ledger.top_up(10 * USD)
    ledger.hold(6 * USD)
    ledger.charge(6 * USD)  # 4 USD left: under 50 %
    ledger.top_up(10 * USD)  # 14 USD: over 50 % of the new top-up, re-armed
    ledger.hold(10 * USD)
    ledger.charge(10 * USD)  # 4 USD left: under 50 % again
    events, _ = run(ledger, LowBalanceAlerts(percent_of_last_top_up=[50]))
    low = of_type(events, "wallet.balance_low")
    assert [e.ledger_id for e in low] == [ledger.entries[2].id, ledger.entries[5].id]


def test_a_credit_that_leaves_available_below_a_threshold_does_not_rearm_it() -> None:
    ledger = Ledger()
    ledger.top_up(10 * USD)
    ledger.hold(6 * USD)
    ledger.charge(6 * USD)  # 4 USD left: under 50 % (5 USD)
    ledger.other("refund", 500_000)  # 4.5 USD: still under
    ledger.hold(1 * USD)
    ledger.charge(1 * USD)
    events, state = run(ledger, LowBalanceAlerts(percent_of_last_top_up=[50]))
    assert len(of_type(events, "wallet.balance_low")) == 1
    assert state.fired == {"pct:50"}


def test_a_refund_lifting_available_over_a_threshold_rearms_it() -> None:
    ledger = Ledger()
    ledger.top_up(10 * USD)
    ledger.hold(6 * USD)
    ledger.charge(6 * USD)
    ledger.other("refund", 1 * USD)  # 5 USD: no longer below 50 %
    _, state = run(ledger, LowBalanceAlerts(percent_of_last_top_up=[50]))
    assert state.fired == frozenset()


def test_an_absolute_threshold_fires_when_available_falls_below_it() -> None:
    ledger = Ledger()
    ledger.top_up(3 * USD)
    ledger.hold(1 * USD)
    ledger.charge(1 * USD)  # 2 USD: not below 2 USD
    ledger.hold(1)
    ledger.charge(1)  # one micro under
    events, _ = run(ledger, LowBalanceAlerts(absolute_micros=[2 * USD], percent_of_last_top_up=[]))
    low = of_type(events, "wallet.balance_low")
    assert [(e.ledger_id, e.data) for e in low] == [
        (ledger.entries[-1].id, {"threshold": "abs:2000000", "threshold_micros": 2 * USD, "available_micros": 2 * USD - 1,
                                 "balance_micros": 2 * USD - 1, "held_micros": 0}),
    ]


def test_the_credit_limit_counts_as_available() -> None:
    ledger = Ledger()
    ledger.top_up(3 * USD)
    ledger.hold(2 * USD)
    ledger.charge(2 * USD)  # 1 USD + 1 USD of credit: not below 2 USD
    events, _ = run(ledger, LowBalanceAlerts(absolute_micros=[2 * USD], percent_of_last_top_up=[]), credit_limit=1 * USD)
    assert of_type(events, "wallet.balance_low") == []


def test_no_percentage_threshold_applies_before_any_top_up() -> None:
    ledger = Ledger()
    ledger.other("adjustment", 10 * USD)
    ledger.hold(9 * USD)
    ledger.charge(9 * USD)
    events, state = run(ledger, PERCENTS)
    assert events == []
    assert state.fired == frozenset()


def test_the_wallets_own_alerts_replace_its_tiers() -> None:
    ledger = Ledger()
    ledger.top_up(10 * USD)
    ledger.hold(6 * USD)
    ledger.charge(6 * USD)  # 4 USD: under the tier's 50 %, over the wallet's own 3 USD
    ledger.hold(2 * USD)
    ledger.charge(2 * USD)  # 2 USD: under 3 USD
    state = WalletEventState(alerts=LowBalanceAlerts(absolute_micros=[3 * USD], percent_of_last_top_up=[]))
    events, _ = run(ledger, alerts_in_force(state, PERCENTS), state)
    assert [e.data["threshold"] for e in of_type(events, "wallet.balance_low")] == ["abs:3000000"]


def test_without_its_own_alerts_a_wallet_gets_its_tiers() -> None:
    assert alerts_in_force(WalletEventState(), PERCENTS) == PERCENTS


# -- determinism and state


def drain_ledger() -> Ledger:
    ledger = Ledger()
    ledger.top_up(10 * USD, reference="pi_1", source="stripe", kind="auto_top_up")
    for i in range(12):
        ledger.hold(900_000, hold_id=f"hold_{i}")
        ledger.charge(900_000, hold_id=f"hold_{i}", request_id=f"req_{i}")
    ledger.note("depleted", reason="refused")
    return ledger


def test_deriving_the_same_entries_twice_gives_identical_events() -> None:
    first, _ = run(drain_ledger(), PERCENTS)
    again, _ = run(drain_ledger(), PERCENTS)
    assert [e.to_dict() for e in first] == [e.to_dict() for e in again]
    assert len({e.id for e in first}) == len(first)


def test_entries_at_or_before_the_cursor_are_not_derived_again() -> None:
    ledger = drain_ledger()
    events, state = run(ledger, PERCENTS)
    again, state_again = derive(WALLET, ledger.entries, state, PERCENTS, 0)
    assert events and again == []
    assert state_again == state


def test_state_round_trips_through_its_fields() -> None:
    state = WalletEventState(cursor="1700000000250-3", last_top_up_micros=10 * USD, fired=frozenset({"pct:50", "abs:2000000"}),
                             alerts=LowBalanceAlerts(absolute_micros=[2 * USD], percent_of_last_top_up=[50, 10]))
    fields = state.to_fields()
    assert all(isinstance(v, str) for v in fields.values())
    assert WalletEventState.from_fields(fields) == state


def test_state_without_alerts_round_trips_through_its_fields() -> None:
    state = WalletEventState(cursor="1700000000250-0", fired=frozenset())
    assert WalletEventState.from_fields(state.to_fields()) == state


def test_an_empty_hash_is_a_new_wallets_state() -> None:
    assert WalletEventState.from_fields({}) == WalletEventState()


OPS = st.one_of(
    st.tuples(st.just("top_up"), st.integers(1, 20 * USD), st.sampled_from(["", "checkout", "auto_top_up"])),
    st.tuples(st.just("charge"), st.integers(0, 3 * USD), st.integers(0, 200_000), st.sampled_from(["completed", "proxy_lost"])),
    st.tuples(st.just("adjustment"), st.integers(-2 * USD, 2 * USD).filter(bool)),
    st.tuples(st.just("refund"), st.integers(1, USD)),
    st.tuples(st.just("card_refund"), st.integers(1, 2 * USD)),
    st.tuples(st.just("expire"), st.integers(0, USD)),
    st.tuples(st.sampled_from(["depleted", "spend_cap_reached", "auto_top_up_failed", "release"])),
)
ALERTS = st.builds(LowBalanceAlerts, absolute_micros=st.lists(st.integers(0, 10 * USD), max_size=3),
                   percent_of_last_top_up=st.lists(st.integers(1, 99), max_size=3))


def build(ops: list[tuple[Any, ...]]) -> Ledger:
    ledger = Ledger()
    for i, op in enumerate(ops):
        kind = op[0]
        if kind == "top_up":
            ledger.top_up(op[1], reference=f"pi_{i}", **({"kind": op[2]} if op[2] else {}))
        elif kind == "charge":
            ledger.hold(op[1], hold_id=f"hold_{i}")
            ledger.charge(op[1], shortfall=op[2], outcome=op[3], hold_id=f"hold_{i}", request_id=f"req_{i}")
        elif kind == "expire":
            ledger.hold(op[1], hold_id=f"hold_{i}")
            ledger.held -= op[1]
            ledger.note("expire", hold_id=f"hold_{i}", held_delta_micros=-op[1])
        elif kind in ("adjustment", "refund", "card_refund"):
            ledger.other(kind, op[1] if kind != "card_refund" else -op[1])
        else:
            ledger.note(kind, reason="refused")
    return ledger


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(OPS, max_size=30), alerts=ALERTS, credit_limit=st.integers(0, 2 * USD), data=st.data())
def test_deriving_in_two_steps_equals_deriving_at_once(
    ops: list[tuple[Any, ...]], alerts: LowBalanceAlerts, credit_limit: int, data: st.DataObject,
) -> None:
    entries = build(ops).entries
    split = data.draw(st.integers(0, len(entries)), label="split")
    whole, whole_state = derive(WALLET, entries, WalletEventState(), alerts, credit_limit)
    first, mid_state = derive(WALLET, entries[:split], WalletEventState(), alerts, credit_limit)
    # The state crosses the split as the consumer keeps it: through the hash's string fields.
    stored = WalletEventState.from_fields(mid_state.to_fields())
    second, end_state = derive(WALLET, entries[split:], stored, alerts, credit_limit)
    assert [e.to_dict() for e in first + second] == [e.to_dict() for e in whole]
    assert end_state == whole_state
