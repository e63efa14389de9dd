"""What metergate tells its operators: every Prometheus metric, the one log line per
call, and how `metergate serve` formats its logs (text, or one JSON object a line).

The rest of the service reports events here at the points where they happen
(the error middleware, the call's `Lease`, the upstream and stream forwarders,
the store's script runner, the reaper); nothing else defines a metric.

Labels stay bounded: model names come from the rate cards, routes are the
route templates, tiers are the cards' tiers, and the remaining labels are
fixed vocabularies. End-user ids and request ids go to the logs, never into
a label. The metrics a call updates are `proxy.metrics`' loop metrics (an update
is an addition, not prometheus-client's locked one); streams are counted once
each, never per chunk.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

import orjson
from aiohttp import web
from prometheus_client import Counter
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxy.metrics import LoopCounter, LoopGauge, LoopHistogram

if TYPE_CHECKING:  # the lease and the store import this module
    from proxy.calls.lease import Lease
    from proxy.config import Config
    from proxy.store import Settlement

log = logging.getLogger("metergate.upstream")
call_log = logging.getLogger("metergate.calls")

# LLM calls run from milliseconds (embeddings) to minutes (long streams).
_CALL_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_FIRST_BYTE_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
# A script round trip is well under a millisecond on a healthy store.
_STORE_BUCKETS = (0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)

REQUESTS = LoopCounter("metergate_requests", "HTTP requests answered, by route template, model and status",
                       ["route", "model", "status"])
REQUEST_SECONDS = LoopHistogram("metergate_request_duration_seconds",
                                "From a request's arrival to its handler's end (a stream's last byte)", ["route"],
                                buckets=_CALL_BUCKETS)
FIRST_BYTE_SECONDS = LoopHistogram("metergate_stream_first_byte_seconds",
                                   "From a streamed call's arrival to its first relayed byte", ["model"],
                                   buckets=_FIRST_BYTE_BUCKETS)
UPSTREAM_SECONDS = LoopHistogram("metergate_upstream_response_seconds",
                                 "From forwarding a call to the upstream's response headers", ["model"],
                                 buckets=_CALL_BUCKETS)
TOKENS = LoopCounter("metergate_tokens", "Tokens billed by settled calls, by model and direction (prompt, completion)",
                     ["model", "direction"])
CHARGED = LoopCounter("metergate_charged_micros", "Micros captured from wallets by settled calls, by model and tier",
                      ["model", "tier"])
SHORTFALL = LoopCounter("metergate_shortfall_micros", "Micros a settlement could not capture from its wallet, by model",
                        ["model"])
CALLS = LoopCounter("metergate_calls", "Metered calls closed, by model and outcome", ["model", "outcome"])
HOLDS = LoopCounter("metergate_holds", "Hold events: opened, clamped, extended, settled, released, expired", ["event"])
PAYMENT_REQUIRED = LoopCounter("metergate_payment_required", "402 answers (no funds, or a spend limit reached)",
                               ["route", "model"])
STORE_SECONDS = LoopHistogram("metergate_store_round_trip_seconds", "Wallet-store script round trips, by script",
                              ["script"], buckets=_STORE_BUCKETS)
STORE_ERRORS = LoopCounter("metergate_store_errors", "Wallet-store round trips that failed (not a script's refusal)",
                           ["script", "kind"])
UPSTREAM_ERRORS = LoopCounter("metergate_upstream_errors", "Upstream failures, by model and kind", ["model", "kind"])
ACTIVE_STREAMS = LoopGauge("metergate_active_streams", "Streams being relayed now")
STRIPE_EVENTS = Counter("metergate_stripe_events", "Stripe webhook events received, by type and outcome "
                        "(applied, duplicate, ignored, bad_signature)", ["type", "outcome"])
WEBHOOK_DELIVERIES = Counter("metergate_webhook_deliveries", "Webhook delivery attempts, by outcome (delivered, failed, "
                             "redelivered)", ["outcome"])
WEBHOOK_ENDPOINTS_DISABLED = Counter("metergate_webhook_endpoints_disabled",
                                     "Webhook endpoints turned off after failing for events.disable_after_seconds")
AUDIT_WRITE_FAILURES = Counter("metergate_audit_write_failures", "Admin audit records the database refused "
                               "(each is logged in full at ERROR)")
AUTO_TOP_UPS = Counter("metergate_auto_top_ups", "Auto top-up attempts, by outcome (succeeded, processing, declined, "
                       "unavailable, disabled)", ["outcome"])

_HOLD_OPENED = HOLDS.labels("opened")
_HOLD_CLAMPED = HOLDS.labels("clamped")
_HOLD_EXTENDED = HOLDS.labels("extended")
_HOLD_SETTLED = HOLDS.labels("settled")
_HOLD_RELEASED = HOLDS.labels("released")
_HOLD_EXPIRED = HOLDS.labels("expired")

# Outcomes of a stream that metergate ended before the upstream finished it.
CUT_OUTCOMES = frozenset({"upstream_cut", "wallet_exhausted", "spend_limit_reached", "budget_reached", "store_unavailable",
                          "internal_error"})
_CLIENT_CLOSED = 499  # nginx's status for a client that went away before its answer

STARTED = web.RequestKey("metergate_started", float)
MODEL = web.RequestKey("metergate_model", str)


# ------------------------------------------------------------------ requests


def request_arrived(request: web.Request) -> float | None:
    """When the request arrived; None when an outer application's middleware has
    it already (the admin sub-application runs the same middleware): counted once."""
    if STARTED in request:
        return None
    started = request[STARTED] = time.perf_counter()
    return started


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"  # never the raw path


def request_answered(request: web.Request, status: int, started: float | None) -> None:
    if started is None:
        return
    route = _route(request)
    model = request.get(MODEL, "")
    REQUESTS.labels(route, model, str(status)).inc()
    REQUEST_SECONDS.labels(route).observe(time.perf_counter() - started)
    if status == 402:
        PAYMENT_REQUIRED.labels(route, model).inc()


def call_started(request: web.Request, lease: Lease) -> None:
    """A metered call has its lease: its requests are counted under its model, and its
    duration runs from the request's arrival."""
    request[MODEL] = lease.model.name
    lease.started_at = request.get(STARTED, lease.started_at)


# --------------------------------------------------------------------- holds


def hold_opened(lease: Lease) -> None:
    _HOLD_OPENED.inc()
    if lease.clamped_to is not None:
        _HOLD_CLAMPED.inc()


def hold_extended() -> None:
    _HOLD_EXTENDED.inc()


def stripe_event(kind: str, outcome: str) -> None:
    STRIPE_EVENTS.labels(kind, outcome.split(":", 1)[0]).inc()


def auto_top_up(outcome: str) -> None:
    AUTO_TOP_UPS.labels(outcome).inc()


def audit_write_failed() -> None:
    AUDIT_WRITE_FAILURES.inc()


def holds_expired(count: int) -> None:
    if count:
        _HOLD_EXPIRED.inc(count)


def call_closed(lease: Lease, settlement: Settlement | None) -> None:
    """Count a closed call's money and write its log line. `settlement` is None when its
    hold could not be closed (the reaper charges its checkpoint): no charge is counted."""
    model, outcome = lease.model.name, _outcome(lease)
    CALLS.labels(model, outcome).inc()
    billed = lease.billed_usage
    if settlement is not None:
        if billed is None:
            _HOLD_RELEASED.inc()
        else:
            _HOLD_SETTLED.inc()
            TOKENS.labels(model, "prompt").inc(billed.prompt_tokens)
            TOKENS.labels(model, "completion").inc(billed.completion_tokens)
            CHARGED.labels(model, lease.caller.tier).inc(settlement.captured_micros)
            if settlement.shortfall_micros:
                SHORTFALL.labels(model).inc(settlement.shortfall_micros)
    if not call_log.isEnabledFor(logging.INFO):
        return
    prompt, completion = (billed.prompt_tokens, billed.completion_tokens) if billed is not None and settlement is not None \
        else (0, 0)
    fields = {
        "request_id": lease.request_id,
        "end_user": lease.caller.end_user_id,
        "model": model,
        "status": _CLIENT_CLOSED if outcome == "client_disconnected" else lease.status,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cost_micros": settlement.captured_micros if settlement is not None else None,
        "duration_ms": round((time.perf_counter() - lease.started_at) * 1000, 1),
        "outcome": outcome,
        "clamped": lease.clamped_to,
    }
    # One f-string, not a join over the dict: a third of the line's cost, once per call.
    call_log.info(
        f"request_id={lease.request_id} end_user={lease.caller.end_user_id} model={model} status={fields['status']} "
        f"prompt_tokens={prompt} completion_tokens={completion} cost_micros={_dash(fields['cost_micros'])} "
        f"duration_ms={fields['duration_ms']} outcome={outcome} clamped={_dash(lease.clamped_to)}",
        extra={"fields": fields})


def _dash(value: object) -> object:
    return "-" if value is None else value


def _outcome(lease: Lease) -> str:
    # An upstream that refused or failed before any output leaves the lease's
    # outcome untouched (its close is a release): name it here.
    return "upstream_error" if lease.failure is not None and lease.outcome == "completed" else lease.outcome


# ------------------------------------------------------------------ upstream


def upstream_responded(lease: Lease, seconds: float, status: int) -> None:
    UPSTREAM_SECONDS.labels(lease.model.name).observe(seconds)
    if status >= 400:
        kind = "rate_limited" if status == 429 else "rejected" if status < 500 else "server_error"
        upstream_failed(lease, kind, f"status {status}")


def upstream_failed(lease: Lease, kind: str, detail: str) -> None:
    """An upstream failure (`kind` from a fixed vocabulary): counted, and logged with its request id."""
    UPSTREAM_ERRORS.labels(lease.model.name, kind).inc()
    log.warning("request %s: upstream %s for %s: %s", lease.request_id, kind, lease.model.name, detail,
                extra={"fields": {"request_id": lease.request_id, "model": lease.model.name, "kind": kind}})


# ------------------------------------------------------------------- streams


def stream_started() -> None:
    ACTIVE_STREAMS.inc()


def stream_first_byte(lease: Lease) -> None:
    FIRST_BYTE_SECONDS.labels(lease.model.name).observe(time.perf_counter() - lease.started_at)


def stream_ended(lease: Lease) -> None:
    ACTIVE_STREAMS.dec()
    if lease.outcome in CUT_OUTCOMES:
        if lease.outcome == "upstream_cut":
            UPSTREAM_ERRORS.labels(lease.model.name, "stream_cut").inc()
        log.warning("request %s: stream cut (%s) after %d output tokens", lease.request_id, lease.outcome,
                    lease.completion_tokens,
                    extra={"fields": {"request_id": lease.request_id, "model": lease.model.name, "outcome": lease.outcome}})


# --------------------------------------------------------------------- store


class _StoreTimer:
    """Times one script round trip; counts it as an error when the store did not answer."""

    __slots__ = ("_script", "_started")

    def __init__(self, script: str) -> None:
        self._script = script
        self._started = 0.0

    def __enter__(self) -> None:
        self._started = time.perf_counter()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            STORE_SECONDS.labels(self._script).observe(time.perf_counter() - self._started)
        elif isinstance(exc, Exception):  # not a cancellation: the caller went away
            STORE_ERRORS.labels(self._script, _store_error_kind(exc)).inc()


def store_round_trip(script: str) -> _StoreTimer:
    """`with store_round_trip(name):` around one round trip to the store."""
    return _StoreTimer(script)


def _store_error_kind(exc: Exception) -> str:
    if isinstance(exc, (RedisTimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(exc, (RedisConnectionError, ConnectionError)):
        return "connection"
    return "error"


# ---------------------------------------------------------------------- logs

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT, with the date and time formatted once a second, not once a line:
    strftime was half of formatting a call's log line."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self._second: tuple[int, str] = (-1, "")

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            return super().format(record)
        # TEXT_FORMAT written out: the stdlib's %-style pass over the record's dict was a
        # third of formatting the call line, once per call.
        record.message = record.getMessage()
        record.asctime = self.formatTime(record)
        return f"{record.asctime} {record.levelname} {record.name}: {record.message}"

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second, stamp = self._second
        if int(record.created) != second:
            stamp = time.strftime(self.default_time_format, self.converter(record.created))
            self._second = (int(record.created), stamp)
        return f"{stamp},{int(record.msecs):03d}"  # the stdlib's default_msec_format, "%s,%03d"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and the record's
    `fields` (the call line's, a failure's request id) as keys of their own."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                entry.setdefault(key, value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class _ServeHandler(logging.StreamHandler[TextIO]):
    """The handler `configure_logging` installs, so a second call replaces it."""


def configure_logging(config: Config) -> None:
    """Log INFO and up to stderr, as text or (`log_format: json`) one JSON object a line."""
    handler = _ServeHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if config.log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _ServeHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    # What neither format shows, so no record pays for it (the logging docs' "Optimization"):
    # the caller's file and line (a stack walk per record: ~1% of a call's CPU with a line per
    # call), and thread, process and multiprocessing names.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
