"""The Stripe client metergate uses (the official library's async calls) and amount conversion."""

from __future__ import annotations

from dataclasses import dataclass

import stripe

from proxy.config import StripeConfig


class StripeNotConfigured(Exception):
    """The config has a `stripe:` block, but its secret key is not in the environment."""


@dataclass
class StripeApi:
    """One `StripeClient` over aiohttp, pointed at `api_base`; closed with the app."""

    config: StripeConfig
    client: stripe.StripeClient
    _http: stripe.AIOHTTPClient

    @classmethod
    def build(cls, config: StripeConfig) -> StripeApi:
        key = config.secret_key
        if not key:
            raise StripeNotConfigured(
                f"stripe: is configured but ${config.secret_key_env} is empty; set it to your Stripe secret key (sk_...)"
            )
        http = stripe.AIOHTTPClient(timeout=30)
        client = stripe.StripeClient(
            key, base_addresses={"api": config.api_base}, http_client=http, max_network_retries=config.max_network_retries,
        )
        return cls(config, client, http)

    async def aclose(self) -> None:
        await self._http.close_async()

    def to_amount(self, micros: int) -> int:
        """Stripe's integer amount (cents for USD) for `micros`; ValueError unless it is a whole unit."""
        per_unit = self.config.micros_per_unit
        if micros % per_unit:
            raise ValueError(f"must be a whole number of {self.config.currency.upper()} minor units ({per_unit} micros)")
        return micros // per_unit

    def to_micros(self, amount: int) -> int:
        return amount * self.config.micros_per_unit
