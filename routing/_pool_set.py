"""The endpoint pickers of the served configuration: one per local GPU pool.

Rules / Theory of operation
---------------------------
* An upstream with two or more ``endpoints`` is a pool and gets an
  ``EndpointPicker`` (``routing/_pool.py`` judges; this module only keeps one
  per pool and routes events to it). A single-endpoint upstream has nothing to
  choose between: it gets no picker and is never scraped; its breaker watches it.
* ``update(upstreams, scrape)`` keeps a pool's picker while its endpoints, its
  ``scrape`` switch and ``latency.scrape`` stay the same. Otherwise it builds a
  new picker that takes over the old one's request counts, so attempts in
  flight end against a count that includes them.
* ``admit(target, now=)`` runs when an attempt is admitted, not when a plan
  is made, so a retry or a hedge is placed by the load as it is then. The
  picker chooses, the request is counted, and the target comes back carrying
  the endpoint. Every admitted attempt ends exactly once, in ``end`` (its
  outcome was recorded, or it was cancelled); an end for an endpoint that a
  reload removed is dropped.
* ``feed_load`` / ``feed_health`` carry the scraper's readings. A reading for
  an upstream or endpoint the configuration no longer has is dropped (a reload
  may land between a scrape and its feed). ``feed_health`` returns an
  ``EndpointChange`` only when the endpoint leaves or rejoins the pool, so the
  shell logs edges, not every check.
* Pools with ``scrape: false`` keep a picker fed by nothing but skyroute's own
  in-flight counts (least outstanding, round-robin on ties).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import final

from ._errors import RoutingStateError
from ._policies import PoolScrape
from ._pool import EndpointPicker, EndpointView, ServerLoad
from ._router_types import Target
from .config import Upstream

__all__ = ["EndpointChange", "PoolPickers"]


@dataclass(frozen=True, slots=True, kw_only=True)
class EndpointChange:
    """A pool endpoint left the pool (``healthy=False``) or came back."""

    upstream: str
    endpoint: str
    healthy: bool
    failed_checks: int


@final
class PoolPickers:
    """One ``EndpointPicker`` per pool upstream, and the pools to scrape."""

    __slots__ = ("_keys", "_pickers", "_scraped")

    def __init__(self) -> None:
        self._pickers: dict[str, EndpointPicker] = {}
        self._keys: dict[str, tuple[object, ...]] = {}
        self._scraped: tuple[Upstream, ...] = ()

    def __repr__(self) -> str:
        return f"<PoolPickers {sorted(self._pickers)} scraped={[u.name for u in self._scraped]}>"

    def update(self, upstreams: Sequence[Upstream], scrape: PoolScrape) -> None:
        """Serve these upstreams, keeping the pickers of pools that did not change."""
        pickers: dict[str, EndpointPicker] = {}
        keys: dict[str, tuple[object, ...]] = {}
        for upstream in upstreams:
            if not upstream.is_pool:
                continue
            key = (upstream.endpoints, upstream.scrape, scrape)
            old = self._pickers.get(upstream.name)
            if old is not None and self._keys[upstream.name] == key:
                picker = old
            else:
                picker = EndpointPicker(upstream.endpoints, stale_after_s=scrape.stale_after_s,
                                        fail_threshold=scrape.unhealthy_after)
                if old is not None:
                    picker.take_over(old)
            pickers[upstream.name], keys[upstream.name] = picker, key
        self._pickers, self._keys = pickers, keys
        self._scraped = tuple(u for u in upstreams if u.is_pool and u.scrape)

    @property
    def scraped(self) -> tuple[Upstream, ...]:
        """The pool upstreams whose servers are to be scraped and health-checked."""
        return self._scraped

    def admit(self, target: Target, *, now: float) -> Target:
        """Choose the endpoint for an admitted attempt and count it as started.

        Returns:
            ``target`` itself for a single-endpoint upstream; for a pool, a copy
            carrying the chosen endpoint. Pass that copy to ``end``.
        """
        picker = self._pickers.get(target.name)
        if picker is None:
            return target
        endpoint = picker.pick(now=now)
        picker.on_request_start(endpoint)
        return dataclasses.replace(target, endpoint=endpoint)

    def end(self, target: Target) -> None:
        """An admitted attempt is over, however it ended."""
        picker = self._pickers.get(target.name)
        if picker is None:
            return
        # A reload may have removed the endpoint while the attempt ran.
        with contextlib.suppress(RoutingStateError):
            picker.on_request_end(target.endpoint)

    def feed_load(self, upstream: str, endpoint: str, load: ServerLoad | None, *,
                  now: float) -> None:
        """One scrape of a pool endpoint's metrics (``None``: it exports none)."""
        picker = self._pickers.get(upstream)
        if picker is not None and endpoint in picker.endpoints:
            picker.on_load(endpoint, load, now=now)

    def feed_health(self, upstream: str, endpoint: str, ok: bool, *,
                    now: float) -> EndpointChange | None:
        """One active health check; the change if the endpoint left or rejoined the pool."""
        picker = self._pickers.get(upstream)
        if picker is None or endpoint not in picker.endpoints:
            return None
        was = picker.is_healthy(endpoint)
        picker.on_health(endpoint, ok, now=now)
        if picker.is_healthy(endpoint) == was:
            return None
        view = next(v for v in picker.snapshot(now=now) if v.endpoint == endpoint)
        return EndpointChange(upstream=upstream, endpoint=endpoint, healthy=not was,
                              failed_checks=view.failed_checks)

    def snapshot(self, *, now: float) -> dict[str, tuple[EndpointView, ...]]:
        """Every pool's endpoints, as its picker sees them."""
        return {name: picker.snapshot(now=now) for name, picker in self._pickers.items()}

