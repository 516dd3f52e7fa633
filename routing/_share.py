"""Where each route's traffic went recently: the traffic share per upstream.

Rules / Theory of operation
---------------------------
``TrafficShare`` counts which upstream *served* each request (the one whose
answer went to the client, after any failover or hedge) per route, and answers
"what share of this route's requests did each upstream serve over the last
``window_s`` seconds". It is what ``/admin/routing`` and the
``skyroute_routing_share`` gauge show, so an operator can see traffic leave a
slow region and come back along its recovery ramp.

Counts live in time buckets of ``window_s / BUCKETS`` seconds per route, so
memory is constant under any load (one small dict per bucket, ``BUCKETS + 1``
buckets per route) and ``record_served`` is O(1). The window is therefore
approximate by up to one bucket: ``share`` sums every bucket that overlaps the
``window_s`` ending at ``now``. A route with no requests in the window has no
shares (an empty dict), not zeros: "no traffic" and "none of the traffic" are
different answers.

Time is always the ``now`` argument; nothing here reads a clock. ``now`` must
not go backwards; a sample stamped earlier than the newest bucket is counted in
the newest bucket rather than rewriting history.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from typing import final

__all__ = ["DEFAULT_SHARE_WINDOW_S", "TrafficShare"]

#: Long enough to hold a few hundred requests at modest load (so a 2 % probe share
#: is visible), short enough that a move away from a slow region shows within
#: seconds of the routing decision.
DEFAULT_SHARE_WINDOW_S = 10.0
#: Buckets per window: the window's edge is accurate to ``window_s / BUCKETS``.
BUCKETS = 10


@final
class TrafficShare:
    """Recent per-route request counts by serving upstream, as shares."""

    __slots__ = ("_buckets", "_width", "window_s")

    def __init__(self, *, window_s: float = DEFAULT_SHARE_WINDOW_S) -> None:
        """Create an empty tracker.

        Args:
            window_s: how far back ``share`` looks, in seconds (> 0).

        Raises:
            ValueError: if ``window_s`` is not a positive finite number.
        """
        if not (math.isfinite(window_s) and window_s > 0):
            raise ValueError(f"window_s must be a positive number of seconds, got {window_s!r}")
        self.window_s = window_s
        self._width = window_s / BUCKETS
        # route -> deque of (bucket start, upstream -> count), oldest first
        self._buckets: dict[str, deque[tuple[float, Counter[str]]]] = {}

    def record_served(self, route: str, upstream: str, now: float) -> None:
        """Count one request on ``route`` answered by ``upstream`` at ``now``."""
        buckets = self._buckets.get(route)
        if buckets is None:
            buckets = self._buckets[route] = deque()
        start = math.floor(now / self._width) * self._width
        if not buckets or start > buckets[-1][0]:
            buckets.append((start, Counter()))
            self._expire(buckets, now)
        buckets[-1][1][upstream] += 1

    def _expire(self, buckets: deque[tuple[float, Counter[str]]], now: float) -> None:
        horizon = now - self.window_s
        while buckets and buckets[0][0] + self._width <= horizon:
            buckets.popleft()

    def counts(self, route: str, *, now: float) -> dict[str, int]:
        """Requests per serving upstream on ``route`` in the window ending at ``now``."""
        buckets = self._buckets.get(route)
        if not buckets:
            return {}
        self._expire(buckets, now)
        total: Counter[str] = Counter()
        for _, counter in buckets:
            total.update(counter)
        return dict(total)

    def share(self, route: str, *, now: float) -> dict[str, float]:
        """Each upstream's share (0..1) of ``route``'s requests in the window.

        Returns:
            upstream -> share, summing to 1.0; empty when the route served
            nothing in the window.
        """
        counts = self.counts(route, now=now)
        total = sum(counts.values())
        return {name: n / total for name, n in counts.items()} if total else {}

    def forget(self, keep: set[str]) -> None:
        """Drop routes not in ``keep`` (after a reload removed them)."""
        for route in [r for r in self._buckets if r not in keep]:
            del self._buckets[route]

    def __repr__(self) -> str:
        routes = ", ".join(f"{r}:{sum(sum(c.values()) for _, c in b)}"
                           for r, b in sorted(self._buckets.items()))
        return f"<TrafficShare window={self.window_s:g}s [{routes}]>"
