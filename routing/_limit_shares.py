"""Per-instance shares of a key's ``rpm``: exact across instances, whatever the delay.

Rules / Theory of operation
---------------------------
* Every instance that takes part (a *writer* heard from within ``SHARE_LIVE_S``) owns
  a share of each limited key's ``rpm``, its *budget*, and admits a request only while
  its own count in the window (exact: its own counters, no delay) is under it. The
  budgets of the live writers add up to ``rpm``, so together they never admit more
  than ``rpm`` in any window, however far apart they are.
* A budget is a base (``rpm`` split evenly over the live writers, sorted by id, the
  remainder to the first ones) plus what others gave this writer minus what it gave
  away. Gifts are cumulative per (key, giver, receiver) and written only by the giver,
  so they survive any reordering of sync messages and nothing is decided twice.
* Only the giver decides, and it gives only budget it has not used in the window:
  ``budget - max(used, target)``. Its own count then stays under its new budget for
  every window that still holds its past requests, and the receiver may spend the
  gift the moment it sees it. Budget in flight belongs to nobody: the delay costs
  admissions (a gift waits one delay), never the limit.
* A writer about to run out (its demand has reached its budget and its count is within
  one of it) gets one more unit from each writer with no demand that holds some beyond
  its target: near the limit the targets leave no headroom, and a key used at one
  instance still gets the whole rpm, one request at a time. Writers with demand of
  their own do not give that way, so a key spread over instances does not churn.
* Targets say where budget should go: the key's ``rpm`` shared max-min fairly over the
  writers' demand (requests that arrived in the last window, admitted or not, or fewer
  if the last 10 s were quieter, pro rata; capped at ``rpm``); with less demand than
  ``rpm``, each writer's demand plus an even whole part of the spare (headroom, so a
  busy writer gets more before it runs out; what does not divide evenly stays where it
  is, so targets agree and budget does not churn). A writer with no traffic yet keeps
  a part and admits at once. Targets only steer gifts; views of demand that differ
  (they travel with a delay) cost a gift that bounces, never the limit.
* A writer counted out (silent ``SHARE_LIVE_S``: gone, restarted under a new id, or cut
  off) still holds what it used in the window, as its own counters say
  (``live_limit``): the live writers share only the rest, which grows as those counts
  leave the window. So a leaving writer costs nothing. When one joins, bases move at
  once, not out of unused budget; so a budget is also capped by the room the others
  leave: the limit less, per other writer, the larger of its budget and its count in
  the window (``budget(used=...)``). The joiner waits until the others' old requests
  have left; their counts travel with a delay, but only ever grow within a budget
  (which the cap counts anyway) or shrink. Through a partition each side shares what
  it last heard the other had not used, while the other goes on using it: each side
  keeps to ``rpm`` on its own.
* Nothing here reads a clock or the store: ``proxy`` feeds arrivals, the live
  writers and their published entries, and publishes ``wire()``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from ._limits import RATE_WINDOW_S, Limit, RateLimited, UsageSlice

DEMAND_RECENT_S: Final = 10.0
"""Demand follows the last this-many seconds of arrivals when they are fewer (pro rata)
than the whole window's: see ``LimitShares.demand``."""
SHARE_LIVE_S: Final = 5.0
"""A writer heard from (any sync write, or its 1 s heartbeat) within this long owns a
base share; one silent longer is counted out and its base goes to the others."""


@dataclass(frozen=True, slots=True)
class PeerShares:
    """What one writer published: its demand per key and its cumulative gifts."""

    demand: Mapping[str, int] = field(default_factory=dict)
    given: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # key -> to -> n

    @classmethod
    def from_wire(cls, value: Any) -> PeerShares | None:
        """Parse a published entry (``{"k": {key: {"d": n, "g": {writer: n}}}}``); None if
        malformed."""
        keys = value.get("k") if isinstance(value, dict) else None
        if not isinstance(keys, dict):
            return None
        demand: dict[str, int] = {}
        given: dict[str, dict[str, int]] = {}
        for key, item in keys.items():
            if not isinstance(item, dict):
                return None
            d, g = item.get("d", 0), item.get("g", {})
            if not _count(d) or not isinstance(g, dict) or not all(
                    _count(n) for n in g.values()):
                return None
            demand[str(key)] = int(d)
            given[str(key)] = {str(w): int(n) for w, n in g.items()}
        return cls(demand=demand, given=given)


def _count(value: Any) -> bool:
    """A whole number >= 0 (sync may carry it as a float)."""
    return isinstance(value, int | float) and not isinstance(value, bool) \
        and math.isfinite(value) and float(value).is_integer() and value >= 0


def live_limit(limit: int, used: Mapping[str, int], live: Iterable[str]) -> int:
    """What the ``live`` writers share: ``limit`` less what writers counted out used in
    the window (``used``: requests per writer, from the usage counters)."""
    alive = set(live)
    return max(0, limit - sum(n for w, n in used.items() if w not in alive))


def base_shares(limit: int, writers: Iterable[str]) -> dict[str, int]:
    """``limit`` split evenly over ``writers`` (sorted; the remainder to the first ones)."""
    ordered = sorted(set(writers))
    if not ordered:
        return {}
    each, extra = divmod(limit, len(ordered))
    return {w: each + (1 if i < extra else 0) for i, w in enumerate(ordered)}


def fair_targets(limit: int, demand: Mapping[str, int]) -> dict[str, int]:
    """Whole shares of ``limit``: max-min fair over ``demand`` (adding up to ``limit``),
    and with less demand than ``limit``, each writer's demand plus an even whole part
    of the rest (what does not divide evenly is nobody's target: it stays where it is)."""
    writers = sorted(demand)
    if not writers:
        return {}
    wanted = {w: max(0, demand[w]) for w in writers}
    total = sum(wanted.values())
    if total <= limit:
        spare = (limit - total) // len(writers)
        return {w: wanted[w] + spare for w in writers}
    level, left = 0.0, float(limit)  # water-filling: the smallest demands are met first
    ordered = sorted(writers, key=lambda w: (wanted[w], w))
    for i, w in enumerate(ordered):
        level = left / (len(ordered) - i)
        if wanted[w] > level:
            break
        left -= wanted[w]
    exact = {w: min(float(wanted[w]), level) for w in writers}
    whole = {w: math.floor(v) for w, v in exact.items()}
    rest = limit - sum(whole.values())
    for w in sorted(writers, key=lambda w: (whole[w] - exact[w], w))[:rest]:
        whole[w] += 1  # largest remainders first, ties by writer id: the same everywhere
    return whole


@dataclass(frozen=True, slots=True, kw_only=True)
class Gift:
    """``units`` of ``key``'s budget given to ``to`` (for the log and metrics)."""

    key: str
    to: str
    units: int


class LimitShares:
    """One writer's side of the shares: its demand, its gifts and its budgets."""

    def __init__(self, writer: str) -> None:
        self.writer = writer
        self._arrivals: dict[str, deque[list[int]]] = {}  # key -> [second, count], oldest first
        self._given: dict[str, dict[str, int]] = {}  # key -> receiver -> cumulative units

    def __repr__(self) -> str:
        return f"<LimitShares {self.writer} keys={len(self._arrivals)}>"

    def arrived(self, key: str, now: float) -> None:
        """A request of ``key`` arrived here (admitted or not): it counts as demand."""
        second = math.floor(now)
        seconds = self._arrivals.setdefault(key, deque())
        if seconds and seconds[-1][0] == second:
            seconds[-1][1] += 1
        else:
            seconds.append([second, 1])

    def demand(self, key: str, now: float) -> int:
        """Requests of ``key`` that arrived here in the last window, or the last
        ``DEMAND_RECENT_S`` of them at that pace if fewer: traffic that moved away stops
        counting within seconds, and a request or two never looks like a stream."""
        seconds = self._arrivals.get(key)
        if not seconds:
            return 0
        while seconds and seconds[0][0] + 1 + RATE_WINDOW_S <= now:
            seconds.popleft()
        recent = sum(n for s, n in seconds if s + 1 + DEMAND_RECENT_S > now)
        paced = math.ceil(recent * RATE_WINDOW_S / DEMAND_RECENT_S)
        return min(sum(n for _, n in seconds), paced)

    def budget(self, key: str, limit: int, live: Iterable[str],
               peers: Mapping[str, PeerShares], used: Mapping[str, int] | None = None) -> int:
        """This writer's budget of ``key``'s ``limit`` now, and no more than what the others
        leave: ``limit`` less, for each other live writer, the larger of its budget and
        what it used in the window (``used``: requests per writer, from the usage
        counters). That room only binds after writers joined: a base that moved still
        holds its old requests there. Below 0: nothing is admitted."""
        budgets = self._budgets(key, limit, live, peers)
        used = used or {}
        room = limit - sum(max(b, used.get(w, 0)) for w, b in budgets.items()
                           if w != self.writer)
        return min(budgets[self.writer], room)

    def unused_elsewhere(self, key: str, limit: int, live: Iterable[str],
                         peers: Mapping[str, PeerShares], used: Mapping[str, int]) -> int:
        """Budget the other live writers hold beyond what they used (``used``: requests per
        writer in the window), as far as this writer has heard: what could move here."""
        budgets = self._budgets(key, limit, live, peers)
        return sum(max(0, b - used.get(w, 0)) for w, b in budgets.items() if w != self.writer)

    def rebalance(self, key: str, limit: int, *, live: Iterable[str],
                  peers: Mapping[str, PeerShares], used: int, now: float,
                  peer_used: Mapping[str, int] | None = None) -> list[Gift]:
        """Give away what this writer holds beyond ``max(used, its target)`` to the live
        writers that need it most: those below their targets, and, from a writer with no
        demand of its own, one unit to those about to run out (demand at least their
        budget, count ``peer_used`` within one of it). Returns the gifts (added to
        ``wire()``)."""
        budgets = self._budgets(key, limit, live, peers)
        demand = {w: min(limit, peers[w].demand.get(key, 0)) if w in peers else 0
                  for w in budgets}
        demand[self.writer] = min(limit, self.demand(key, now))
        targets = fair_targets(limit, demand)
        excess = budgets[self.writer] - max(used, targets[self.writer])
        gifts = []
        peer_used = peer_used or {}
        idle = demand[self.writer] == 0
        needs = {w: max(targets[w] - budgets[w], 1 if idle and demand[w] >= budgets[w] and
                        peer_used.get(w, 0) >= budgets[w] - 1 else 0)
                 for w in budgets if w != self.writer}
        needy = sorted((-n, w) for w, n in needs.items() if n > 0)  # the most needed first
        for shortfall, to in needy:
            if excess <= 0:
                break
            units = min(excess, -shortfall)
            given = self._given.setdefault(key, {})
            given[to] = given.get(to, 0) + units
            excess -= units
            gifts.append(Gift(key=key, to=to, units=units))
        return gifts

    def wire(self, now: float, limits: Mapping[str, int]) -> dict[str, Any]:
        """This writer's entry for peers: demand (capped at the limit) and gifts per key."""
        keys: dict[str, Any] = {}
        for key in sorted(set(self._arrivals) | set(self._given)):
            if key not in limits:
                continue
            keys[key] = {"d": min(limits[key], self.demand(key, now)),
                         "g": dict(sorted(self._given.get(key, {}).items()))}
        return {"w": self.writer, "k": keys}

    def _budgets(self, key: str, limit: int, live: Iterable[str],
                 peers: Mapping[str, PeerShares]) -> dict[str, int]:
        writers = set(live) | {self.writer}
        budgets = base_shares(limit, writers)
        for giver in writers:
            gifts = (self._given.get(key, {}) if giver == self.writer
                     else peers[giver].given.get(key, {}) if giver in peers else {})
            for to, units in gifts.items():
                if to in budgets and to != giver:  # gifts to writers counted out return
                    budgets[to] += units
                    budgets[giver] -= units
        return budgets


def check_share(*, key: str, rpm: int, budget: int, own: Sequence[UsageSlice],
                usage: Sequence[UsageSlice], now: float,
                unused_elsewhere: int = 0) -> RateLimited | None:
    """Refuse a request of ``key`` when this instance's own count is at its ``budget``.

    Args:
        own: this instance's counted slices of the key; ``usage``: every instance's.
        unused_elsewhere: budget other instances hold and have not used
            (``LimitShares.unused_elsewhere``).

    Returns:
        None to admit; else a refusal whose Retry-After is 1 s when others hold unused
        budget (this instance's demand moves it here within a tick and a round trip),
        else when enough of this instance's oldest counts leave the window to fall
        under its budget, or, with no budget here, when the key's oldest count anywhere
        leaves it (a peer can give only what has left its window).
    """
    live = sorted((s for s in own if s.end + RATE_WINDOW_S > now), key=lambda s: s.end)
    used = sum(s.requests for s in live)
    if used < budget:
        return None
    at = now
    if unused_elsewhere > 0:
        pass  # at least a second: the soonest a client is told to come back
    elif budget > 0:
        left = used
        for s in live:
            left -= s.requests
            at = s.end + RATE_WINDOW_S
            if left < budget:
                break
    else:
        ends = [s.end + RATE_WINDOW_S for s in usage if s.end + RATE_WINDOW_S > now]
        at = min(ends, default=now)
    wait = max(1, math.ceil(at - now))
    total = sum(s.requests for s in usage if s.end + RATE_WINDOW_S > now)
    return RateLimited(limit=Limit.REQUESTS, allowed=rpm, used=max(total, used), retry_after_s=wait,
                       message=(
        f"rate limit for key '{key}': {rpm} requests per minute across all skyroute "
        f"instances, and this instance's share ({max(budget, 0)}) is used; "
        f"retry after {wait}s"))
