"""The rate cards the service prices with, swapped whole on reload.

Requests read `registry.current` once and keep that object for the whole
call, so a reload never prices one request with two sets, and a request
already held settles at the price it was held at.
"""

from __future__ import annotations

import logging
from pathlib import Path

from prometheus_client import Counter

from pricing import RateCardError, RateCardSet, load_rate_cards

log = logging.getLogger(__name__)

RELOADS = Counter("metergate_ratecard_reloads_total", "Rate card reloads by outcome", ["outcome"])


class RateCardRegistry:
    def __init__(self, directory: Path, upstreams: set[str]):
        self.directory = directory
        self.upstreams = upstreams
        self.current: RateCardSet = load_rate_cards(directory, upstreams=upstreams)

    def reload(self) -> bool:
        """Load the cards again; on any error keep the running set, log and count it."""
        try:
            fresh = load_rate_cards(self.directory, upstreams=self.upstreams)
        except RateCardError as exc:
            RELOADS.labels(outcome="refused").inc()
            log.error("rate card reload refused; the running cards stay in force:\n%s", exc)
            return False
        self.current = fresh
        RELOADS.labels(outcome="loaded").inc()
        log.info("rate cards reloaded: %s", ", ".join(c.ref for c in fresh.all_cards()))
        return True
