"""The proxy side of rate-limit shares: feeds ``routing.LimitShares`` from statesync.

``routing.LimitShares`` decides (budgets, gifts; see its module doc); this module
reads the live writers and their published entries from the ``SessionStore`` every
``SHARE_TICK_S``, lets the shares rebalance each key that has an ``rpm``, publishes
this instance's entry, and sets ``skyroute_rate_limit_share`` (this instance's
budget per key). ``enforce_limits`` asks ``budget`` on every request.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, Final

import structlog
from aiohttp import web
from skyroute.routing import SHARE_LIVE_S, Config, LimitShares, PeerShares, live_limit
from skyroute.statesync import SessionStore

from ._metrics import Metrics
from ._state import METRICS, SERVING, STATE_SYNC
from ._tasks import running

log = structlog.get_logger("skyroute.limits")

SHARE_TICK_S: Final = 0.1
"""How often shares are rebalanced and published: a gift waits at most this long here,
then one sync delay on its way."""
DEMAND_PUBLISH_S: Final = 0.25
"""A change of demand alone is published at most this often (gifts at once): demand
below the limit changes with every request, and each write is a document update."""


class SharedLimits:
    """This instance's ``LimitShares`` and its latest view of the other writers."""

    def __init__(self, store: SessionStore) -> None:
        self.shares = LimitShares(store.writer_id)
        self._live: frozenset[str] = frozenset({store.writer_id})
        self._peers: dict[str, PeerShares] = {}
        self._limits: dict[str, int] = {}  # key -> what the live writers share of its rpm
        self._unused: dict[str, int] = {}  # key -> budget others hold and have not used
        self._used: dict[str, dict[str, int]] = {}  # key -> other writer -> its count
        self._published: dict[str, Any] = {}
        self._published_at = -math.inf

    def __repr__(self) -> str:
        return f"<SharedLimits {self.shares.writer} live={len(self._live)}>"

    @property
    def live(self) -> frozenset[str]:
        """The writers (this one included) that own a base share now."""
        return self._live

    def budget(self, key: str, rpm: int) -> int:
        """This instance's budget of ``key``'s ``rpm`` now."""
        return self.shares.budget(key, min(rpm, self._limits.get(key, rpm)), self._live,
                                  self._peers, self._used.get(key))

    def arrived(self, key: str, now: float) -> None:
        """A request of ``key`` arrived here (admitted or not): it counts as demand."""
        self.shares.arrived(key, now)

    def unused_elsewhere(self, key: str) -> int:
        """Budget of ``key`` the other live instances hold unused (as of the last tick)."""
        return self._unused.get(key, 0)

    def refresh(self, store: SessionStore, *, now: float) -> None:
        """Read the live writers and their entries from ``store``."""
        live = frozenset({store.writer_id} | {
            w for w, at in store.heard_from().items() if now - at <= SHARE_LIVE_S})
        if live != self._live:
            log.info("rate_share_instances", live_instances=len(live),
                     joined=sorted(live - self._live), left=sorted(self._live - live))
        self._live = live
        peers = {}
        for writer, value in store.peer_shares().items():
            parsed = PeerShares.from_wire(value)
            if parsed is not None and writer in self._live:
                peers[writer] = parsed
        self._peers = peers

    def tick(self, store: SessionStore, limits: Mapping[str, int], metrics: Metrics, *,
             now: float) -> None:
        """Refresh, rebalance every key with an ``rpm`` and publish this writer's entry.

        Args:
            limits: each key's ``rpm``, for the keys that have one (``rpm_limits``).
        """
        if not limits and not self._published:
            return  # no key has an rpm: nothing to share, nothing written
        self.refresh(store, now=now)
        for name, rpm in limits.items():
            self._used[name] = by_writer = store.usage_by_writer(name, now=now)
            self._limits[name] = limit = live_limit(rpm, by_writer, self._live)
            used = sum(b.requests for b in store.own_usage_buckets(name, now=now))
            for gift in self.shares.rebalance(name, limit, live=self._live, peers=self._peers,
                                              used=used, now=now, peer_used=by_writer):
                metrics.rate_share_given.labels(name).inc(gift.units)
                log.info("rate_share_given", key=name, to=gift.to, units=gift.units,
                         live_instances=len(self._live))
            self._unused[name] = self.shares.unused_elsewhere(name, limit, self._live,
                                                              self._peers, by_writer)
            metrics.rate_share.labels(name).set(max(0, self.budget(name, rpm)))
        for gone in set(self._limits) - set(limits):  # keys a reload removed (or their rpm)
            del self._limits[gone]
            metrics.drop_series(metrics.rate_share, gone)
            self._unused.pop(gone, None)
            self._used.pop(gone, None)
        self._publish(store, self.shares.wire(now, limits), now=now)

    def _publish(self, store: SessionStore, entry: dict[str, Any], *, now: float) -> None:
        gifts = {k: v["g"] for k, v in entry["k"].items()}
        published = {k: v["g"] for k, v in self._published.get("k", {}).items()}
        if gifts != published or (entry != self._published
                                  and now - self._published_at >= DEMAND_PUBLISH_S):
            store.publish_shares(entry)
            self._published, self._published_at = entry, now


LIMIT_SHARES = web.AppKey("limit_shares", SharedLimits)


def rpm_limits(config: Config) -> dict[str, int]:
    """Each client key's ``rpm``, for the keys that have one."""
    return {k.name: k.rpm for k in config.api_keys or () if k.rpm is not None}


async def limit_share_loop(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: rebalance and publish rate-limit shares every ``SHARE_TICK_S``
    (``app[LIMIT_SHARES]`` is set where the app is built)."""

    async def loop() -> None:
        config: Config | None = None
        limits: dict[str, int] = {}
        while True:
            await asyncio.sleep(SHARE_TICK_S)
            current = app[SERVING].runtime.config
            if current is not config:  # per config, not per tick: 100,000 keys are many
                config, limits = current, rpm_limits(current)
            app[LIMIT_SHARES].tick(app[STATE_SYNC].store, limits, app[METRICS], now=time.time())

    async with running(loop(), name="skyroute-limit-shares"):
        yield
