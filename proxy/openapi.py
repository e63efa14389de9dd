"""The OpenAPI 3.1 document served at /openapi.json, built from the same models the handlers use."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from proxy import admin_grants, admin_jobs, admin_meters, schemas
from proxy.ledger.audit import AuditPage
from proxy.ledger.report_routes import CreateStatementLink, StatementLinkView
from proxy.openapi_v1 import v1_paths

_MODELS: list[type[BaseModel]] = [
    schemas.CreateEndUser, schemas.UpdateEndUser, schemas.CreateKey, schemas.TopUp, schemas.Refund, schemas.Adjustment,
    schemas.WalletView, schemas.ReceiptView, schemas.LedgerPage, schemas.EndUserView, schemas.KeyView,
    schemas.CreatedKeyView, schemas.KeyList, schemas.RateCardsView, schemas.UpdateKey, schemas.MintToken, schemas.TokenView,
    schemas.StartCheckout, schemas.AdminStartCheckout, schemas.CheckoutSessionView, schemas.UpdateAutoTopUp, schemas.AutoTopUpView,
    schemas.StartCardRefund, schemas.CardRefundView, schemas.CardPaymentList,
    schemas.CreateWebhookEndpoint, schemas.UpdateWebhookEndpoint, schemas.RotateWebhookSecret, schemas.WebhookEndpointView,
    schemas.WebhookEndpointList, schemas.EventPage, schemas.EventDetailView, schemas.Redeliver, schemas.BalanceAlerts,
    schemas.BalanceAlertsView, AuditPage, CreateStatementLink, StatementLinkView,
    admin_jobs.OpenJobHold, admin_jobs.ExtendJobHold, admin_jobs.CaptureJobHold, admin_jobs.ReleaseJobHold,
    admin_jobs.JobHoldView, admin_jobs.CaptureView, admin_jobs.ReleaseView, admin_meters.MeterEvent, admin_meters.MeterChargeView,
    admin_grants.CreateGrant, admin_grants.GrantView, admin_grants.GrantList, admin_grants.CreatedGrantView, admin_grants.UpdateWallet,
]

_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"}, "type": {"type": "string"},
                "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]},
            },
        }
    },
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


_REPORT_PARAMS = [
    {"name": "from", "in": "query", "schema": {"type": "string", "format": "date"}, "description": "inclusive, UTC"},
    {"name": "to", "in": "query", "schema": {"type": "string", "format": "date"}, "description": "exclusive, UTC"},
    {"name": "format", "in": "query", "schema": {"enum": ["json", "csv"]}},
    {"name": "include_simulated", "in": "query", "schema": {"type": "boolean", "default": False},
     "description": "true: also count test end users' (sandbox) entries, which are left out by default"},
]


def _op(summary: str, ok: int, response: type[BaseModel] | None, body: type[BaseModel] | None = None,
        params: list[dict[str, Any]] | None = None, errors: tuple[int, ...] = (400, 401, 404)) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "security": [{"adminKey": []}], "responses": {}}
    if params:
        op["parameters"] = params
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(body)}}}
    op["responses"][str(ok)] = {
        "description": "OK",
        **({"content": {"application/json": {"schema": _ref(response)}}} if response else {}),
    }
    for status in errors:
        op["responses"][str(status)] = {"$ref": "#/components/responses/Error"}
    return op


def _path_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


_IDEMPOTENCY = {
    "name": "Idempotency-Key", "in": "header", "required": True, "schema": {"type": "string", "maxLength": 255},
    "description": "replaying a key returns the first answer; the same key with another body is a 409",
}


@lru_cache(maxsize=1)
def document() -> dict[str, Any]:
    _, defs = models_json_schema([(m, "validation") for m in _MODELS], ref_template="#/components/schemas/{model}")
    uid, kid, hold = _path_param("id"), _path_param("key_id"), _path_param("hold_id")
    money = (400, 401, 404, 409)
    paths = {
        "/admin/end-users": {"post": _op("Create an end user and their wallet", 201, schemas.EndUserView, schemas.CreateEndUser, errors=(400, 401, 409))},
        "/admin/end-users/{id}": {
            "get": _op("Get an end user", 200, schemas.EndUserView, params=[uid]),
            "patch": _op("Change an end user's tier, card pin (grandfathering) or metadata", 200, schemas.EndUserView,
                         schemas.UpdateEndUser, params=[uid]),
        },
        "/admin/end-users/{id}/keys": {
            "post": _op("Issue an sk-eu_ key (sk-eu_test_ for a test end user; shown once)", 201, schemas.CreatedKeyView, schemas.CreateKey, params=[uid]),
            "get": _op("List an end user's keys, masked", 200, schemas.KeyList, params=[uid]),
        },
        "/admin/end-users/{id}/tokens": {"post": _op("Mint a short-lived end-user token (JWT)", 201, schemas.TokenView, schemas.MintToken, params=[uid], errors=(400, 401, 404, 409))},
        "/admin/end-users/{id}/keys/{key_id}": {
            "delete": _op("Revoke a key", 200, schemas.KeyView, params=[uid, kid]),
            "patch": _op("Change a key's name or limits (null removes a limit)", 200, schemas.KeyView, schemas.UpdateKey, params=[uid, kid]),
        },
        "/admin/wallets/{id}": {
            "get": _op("Balance, held, available and credit limit", 200, schemas.WalletView, params=[uid]),
            "patch": _op("Change the credit limit (postpay), with a reason", 200, schemas.ReceiptView, admin_grants.UpdateWallet,
                         [uid], (*money,)),
        },
        "/admin/wallets/{id}/grants": {
            "post": _op("Grant credit of a kind, with a priority and an optional expiry", 201, admin_grants.CreatedGrantView,
                        admin_grants.CreateGrant, [uid, _IDEMPOTENCY], money),
            "get": _op("The wallet's grants in the order calls spend them", 200, admin_grants.GrantList, params=[uid]),
        },
        "/admin/wallets/{id}/top-ups": {"post": _op("Add funds", 201, schemas.ReceiptView, schemas.TopUp, [uid, _IDEMPOTENCY], money)},
        "/admin/wallets/{id}/refunds": {"post": _op("Refund (part of) a charge", 201, schemas.ReceiptView, schemas.Refund, [uid, _IDEMPOTENCY], money)},
        "/admin/wallets/{id}/adjustments": {"post": _op("Signed correction with a reason", 201, schemas.ReceiptView, schemas.Adjustment, [uid, _IDEMPOTENCY], (*money, 402))},
        "/admin/wallets/{id}/meter-events": {"post": _op(
            "Charge a usage event of one of your meters (the card's price, after its free units)", 201,
            admin_meters.MeterChargeView, admin_meters.MeterEvent, [uid, _IDEMPOTENCY], (*money, 402))},
        "/admin/wallets/{id}/holds": {"post": _op("Open a job hold: reserve a long job's budget for a TTL", 201, admin_jobs.JobHoldView,
                                                  admin_jobs.OpenJobHold, [uid, _IDEMPOTENCY], (*money, 402))},
        "/admin/wallets/{id}/holds/{hold_id}": {"get": _op("A job hold: held, captured, expiry", 200, admin_jobs.JobHoldView,
                                                           params=[uid, hold])},
        "/admin/wallets/{id}/holds/{hold_id}/extend": {"post": _op(
            "Grow a job hold to a new amount and push its expiry back", 200, admin_jobs.JobHoldView, admin_jobs.ExtendJobHold,
            [uid, hold], (*money, 402))},
        "/admin/wallets/{id}/holds/{hold_id}/captures": {"post": _op(
            "Capture part of a job hold for good (the rest stays held)", 201, admin_jobs.CaptureView, admin_jobs.CaptureJobHold,
            [uid, hold, _IDEMPOTENCY], money)},
        "/admin/wallets/{id}/holds/{hold_id}/release": {"post": _op(
            "Release what a job hold has left", 200, admin_jobs.ReleaseView, admin_jobs.ReleaseJobHold, [uid, hold], money)},
        "/admin/wallets/{id}/ledger": {"get": _op("Ledger entries, newest first", 200, schemas.LedgerPage, params=[
            uid,
            {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}},
            {"name": "starting_after", "in": "query", "schema": {"type": "string"}, "description": "next_cursor of the previous page"},
        ])},
        "/admin/ratecards": {"get": _op("The rate cards in force and the tier map", 200, schemas.RateCardsView, errors=(401,))},
        "/admin/ratecards/reload": {"post": _op(
            "Reload the rate cards from disk; an invalid set is refused (422, with file:line) and the running one stays",
            200, schemas.RateCardsView, errors=(401, 422))},
        "/admin/end-users/{id}/checkout-sessions": {"post": _op(
            "Start a Stripe Checkout top-up for an end user (501 without stripe:)", 201, schemas.CheckoutSessionView,
            schemas.AdminStartCheckout, params=[uid], errors=(400, 401, 404, 501))},
        "/admin/end-users/{id}/auto-top-up": {
            "get": _op("The saved card and auto top-up rule, with its failures", 200, schemas.AutoTopUpView, params=[uid], errors=(401, 404, 501)),
            "patch": _op("Change or re-enable the auto top-up rule (enabling needs a saved card)", 200, schemas.AutoTopUpView,
                         schemas.UpdateAutoTopUp, params=[uid], errors=(400, 401, 404, 501)),
        },
        "/admin/end-users/{id}/card-payments": {"get": _op("Card payments that credited the wallet, and what is refundable", 200,
                                                           schemas.CardPaymentList, params=[uid], errors=(401, 404, 501))},
        "/admin/end-users/{id}/card-refunds": {"post": _op(
            "Refund unspent credit to the card that paid it (debited first; restored if Stripe refuses)", 201, schemas.CardRefundView,
            schemas.StartCardRefund, [uid, _IDEMPOTENCY], (400, 401, 402, 404, 409, 501, 502))},
        "/admin/webhook-endpoints": {
            "post": _op("Register a webhook endpoint (its signing secret is shown only now)", 201, schemas.WebhookEndpointView,
                        schemas.CreateWebhookEndpoint, errors=(400, 401)),
            "get": _op("List webhook endpoints (secrets masked)", 200, schemas.WebhookEndpointList, errors=(401,)),
        },
        "/admin/webhook-endpoints/{id}": {
            "get": _op("A webhook endpoint and where its delivery stands", 200, schemas.WebhookEndpointView, params=[uid]),
            "patch": _op("Change or re-enable an endpoint (re-enabled, it resumes where it stopped)", 200,
                         schemas.WebhookEndpointView, schemas.UpdateWebhookEndpoint, params=[uid]),
            "delete": _op("Remove an endpoint", 200, None, params=[uid]),
        },
        "/admin/webhook-endpoints/{id}/rotate-secret": {"post": _op(
            "New signing secret (shown once); the old one also signs during the grace", 200, schemas.WebhookEndpointView,
            schemas.RotateWebhookSecret, params=[uid])},
        "/admin/events": {"get": _op("Events, newest first", 200, schemas.EventPage, params=[
            {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}},
            {"name": "starting_after", "in": "query", "schema": {"type": "string"}, "description": "next_cursor of the previous page"},
            {"name": "type", "in": "query", "schema": {"type": "string"}},
            {"name": "end_user", "in": "query", "schema": {"type": "string"}},
        ], errors=(400, 401))},
        "/admin/events/{id}": {"get": _op("An event with every delivery attempt", 200, schemas.EventDetailView, params=[uid])},
        "/admin/events/{id}/redeliver": {"post": _op("Send an event again", 202, None, schemas.Redeliver, params=[uid])},
        "/admin/audit": {"get": _op("Admin changes (and refusals), newest first; readable by every role", 200, AuditPage, params=[
            *({"name": n, "in": "query", "schema": {"type": "string"}} for n in ("actor", "target", "action")),
            *({"name": n, "in": "query", "schema": {"type": "integer"}} for n in ("from_ms", "to_ms", "starting_after")),
            {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}},
        ], errors=(400, 401))},
        "/admin/reports/usage": {"get": _op(
            "Spend, price, cost, margin, tokens and calls from the ledger of record (format=csv streams CSV)", 200, None,
            params=[*_REPORT_PARAMS,
                    {"name": "group_by", "in": "query", "schema": {"type": "string", "default": "end_user"},
                     "description": "comma-separated: end_user, model, key, tier, day, month"},
                    *({"name": n, "in": "query", "schema": {"type": "string"}} for n in ("end_user", "model"))],
            errors=(400, 401))},
        "/admin/reports/money": {"get": _op(
            "Top-ups, refunds, adjustments, card refunds and disputes by period", 200, None,
            params=[*_REPORT_PARAMS, {"name": "period", "in": "query", "schema": {"enum": ["day", "month"]}},
                    {"name": "end_user", "in": "query", "schema": {"type": "string"}}], errors=(400, 401))},
        "/admin/end-users/{id}/rollups": {"get": _op(
            "The end user's months: carried in, top-ups, spend, refunds, other, carried out", 200, None, params=[
                uid, *({"name": n, "in": "query", "schema": {"type": "string"}, "description": "YYYY-MM"}
                       for n in ("from_month", "to_month")),
                {"name": "format", "in": "query", "schema": {"enum": ["json", "csv"]}}], errors=(400, 401))},
        "/admin/end-users/{id}/statement-links": {"post": _op(
            "A signed, expiring link to the end user's statement page (and its CSV) for a month", 201,
            StatementLinkView, CreateStatementLink, params=[uid])},
        "/v1/usage": {"get": {**_op(
            "The caller's own charges and money movements (ledger of record), newest first", 200, None,
            params=[{"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500}},
                    {"name": "starting_after", "in": "query", "schema": {"type": "string"}},
                    *({"name": n, "in": "query", "schema": {"type": "string", "format": "date"}} for n in ("from", "to"))],
            errors=(400, 401)), "security": [{"endUserKey": []}]}},
        "/admin/end-users/{id}/balance-alerts": {
            "get": _op("The low-balance thresholds in force (the wallet's own, or its tier's)", 200, schemas.BalanceAlertsView, params=[uid]),
            "put": _op("Set the wallet's own low-balance thresholds", 200, schemas.BalanceAlertsView, schemas.BalanceAlerts, params=[uid]),
        },
        "/v1/wallet/checkout-sessions": {"post": {**_op(
            "An end user starts a Stripe Checkout top-up of their own wallet", 201, schemas.CheckoutSessionView,
            schemas.StartCheckout, errors=(400, 401, 501)), "security": [{"endUserKey": []}]}},
        "/v1/wallet/top-up-options": {"get": {"summary": "Currency, presets, minimum and maximum of a top-up",
                                              "security": [{"endUserKey": []}], "responses": {"200": {"description": "OK"}}}},
        "/stripe/webhook": {"post": {"summary": "Stripe's events (Stripe-Signature checked; each applied once)", "security": [],
                                     "responses": {"200": {"description": "received"}, "400": {"$ref": "#/components/responses/Error"}}}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text exposition format"}}}},
        "/healthz": {"get": {"summary": "Liveness", "responses": {"200": {"description": "alive"}}}},
        "/readyz": {"get": {"summary": "Readiness (the store answers)", "responses": {"200": {"description": "ready"}, "503": {"description": "not ready"}}}},
        **v1_paths(),
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "metergate", "version": "0.1.0", "description": "Metering proxy with prepaid wallets. Amounts are integer micros (1 USD = 1,000,000)."},
        "paths": paths,
        "components": {
            "schemas": {**defs.get("$defs", {}), "Error": _ERROR_SCHEMA},
            "responses": {"Error": {"description": "Error in OpenAI's shape", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}},
            "securitySchemes": {"adminKey": {"type": "http", "scheme": "bearer"},
                                "endUserKey": {"type": "http", "scheme": "bearer", "description": "an sk-eu_ key (sk-eu_test_: test mode), an end-user token, or an operator key "
                                                                  "(or operator test key) with `user`"}},
        },
    }


async def handler(request: web.Request) -> web.Response:
    return web.Response(body=orjson.dumps(document()), content_type="application/json")
