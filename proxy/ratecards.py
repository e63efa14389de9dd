"""The rate cards the service prices with, swapped whole on reload.

Requests read `registry.current` once and keep that object for the whole
call, so a reload never prices one request with two sets, and a request
already held settles at the price it was held at. Reloads come from SIGHUP,
from a change to a card file (polled: it also sees Kubernetes ConfigMap
symlink swaps, which inotify watchers often miss), or from the admin API.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from prometheus_client import Counter

from pricing import RateCardError, RateCardSet, load_rate_cards

log = logging.getLogger(__name__)

RELOADS = Counter("metergate_ratecard_reloads_total", "Rate card reloads by outcome", ["outcome"])


class RateCardRegistry:
    def __init__(self, directory: Path, upstreams: set[str], assets: set[str] | None = None):
        self.directory = directory
        self.upstreams = upstreams
        self.assets = assets
        self.current: RateCardSet = load_rate_cards(directory, upstreams=upstreams, assets=assets)
        self.last_error: RateCardError | None = None
        self._lock = asyncio.Lock()
        # Told (loaded?, what: the cards now in force, or why the reload was refused); set by the app factory.
        self.on_reload: Callable[[bool, str], None] | None = None

    def files_signature(self) -> tuple[tuple[str, int, int], ...]:
        """What the card files look like on disk now; a change means a reload is due."""
        entries = []
        for path in sorted(self.directory.glob("*.y*ml")):
            try:
                st = path.stat()
            except OSError:
                continue
            entries.append((path.name, st.st_mtime_ns, st.st_size))
        return tuple(entries)

    async def reload(self) -> bool:
        """Load the cards again (off the event loop); on any error keep the running set, log and count it."""
        async with self._lock:
            try:
                fresh = await asyncio.to_thread(load_rate_cards, self.directory, upstreams=self.upstreams, assets=self.assets)
            except RateCardError as exc:
                self.last_error = exc
                RELOADS.labels(outcome="refused").inc()
                log.error("rate card reload refused; the running cards stay in force:\n%s", exc)
                if self.on_reload is not None:
                    self.on_reload(False, str(exc))
                return False
            self.current = fresh
            self.last_error = None
            RELOADS.labels(outcome="loaded").inc()
            refs = ", ".join(c.ref for c in fresh.all_cards())
            log.info("rate cards reloaded: %s", refs)
            if self.on_reload is not None:
                self.on_reload(True, refs)
            return True

    async def watch(self, interval: float) -> None:
        """Reload whenever the card files change on disk."""
        seen = self.files_signature()
        while True:
            await asyncio.sleep(interval)
            now = self.files_signature()
            if now != seen:
                seen = now
                await self.reload()
