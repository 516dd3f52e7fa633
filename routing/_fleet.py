"""Every upstream's state, kept current by events so that a request reads it in O(1).

Rules / theory of operation
---------------------------
* Degradation levels need instance-wide numbers (how many upstreams are available,
  for ``minimal`` mode); a request must not pay for walking the fleet to get them.
  ``FleetStates`` holds each upstream's ``UpstreamState`` and the count of available
  ones, and changes them only when something happened:
  - an event: ``UpstreamHealth.watch`` reports the upstream's name whenever its state
    may have changed (an outcome, a peer's report, a latency estimate, its breaker
    moving); the name is marked and re-read at the next ``refresh``;
  - time: between events a state changes only at ``UpstreamHealth.next_change_at`` (a
    cool-down ending). Those times wait in a heap; ``refresh(now)`` re-reads the
    upstreams whose time has come.
  So ``refresh`` costs O(1) plus O(log n) per upstream that changed.
* The first ``refresh`` after ``reset`` (a new configuration) reads every upstream
  once. A ``now`` earlier than the last one (a test's clock set back) re-reads all:
  always right, just slower.
* ``generation`` grows whenever a state or the count changes: a reader may keep what
  it derived from the states (a ``LevelView``) until it moves.
* Nothing here reads a clock: ``now`` is always an argument.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping
from typing import final

from ._health import AVAILABLE, UpstreamHealth, UpstreamState


@final
class FleetStates:
    """The states of every upstream of the configuration, and how many are available."""

    __slots__ = ("_dirty", "_health", "_now", "_soonest_back", "_wake_at", "_wakes",
                 "available", "generation", "states")

    def __init__(self) -> None:
        self._health: Mapping[str, UpstreamHealth] = {}
        self.states: dict[str, UpstreamState] = {}
        self.available = 0
        self.generation = 0
        self._dirty: set[str] = set()
        self._wakes: list[tuple[float, str]] = []  # (time, name); stale ones skipped
        self._wake_at: dict[str, float] = {}  # the live wake-up time of each upstream
        self._now = -math.inf
        self._soonest_back: float | None = None

    def __repr__(self) -> str:
        return f"<FleetStates available={self.available}/{len(self._health)}>"

    def reset(self, health: Mapping[str, UpstreamHealth]) -> None:
        """Watch ``health`` (a new configuration's upstreams) instead of the previous set."""
        for name, old in self._health.items():
            if health.get(name) is not old:
                old.watch(None)
        self._health = health
        for upstream in health.values():
            upstream.watch(self._dirty.add)
        self.states, self.available = {}, 0
        self._wakes, self._wake_at = [], {}
        self._dirty.clear()
        self._dirty.update(health)
        self._soonest_back = None
        self.generation += 1

    def refresh(self, *, now: float) -> None:
        """Bring every state up to ``now``: marked upstreams, and those whose time came."""
        if now < self._now:
            self._dirty.update(self._health)
        self._now = now
        wakes = self._wakes
        while wakes and wakes[0][0] <= now:
            at, name = heapq.heappop(wakes)
            if self._wake_at.get(name) == at:
                del self._wake_at[name]
                self._dirty.add(name)
        if not self._dirty:
            return
        dirty = list(self._dirty)
        self._dirty.clear()
        for name in dirty:
            self._read(name, now)
        self._soonest_back = None
        if len(wakes) > 2 * len(self._wake_at) + 64:  # mostly stale entries: rebuild
            self._wakes = [(at, name) for name, at in self._wake_at.items()]
            heapq.heapify(self._wakes)

    def _read(self, name: str, now: float) -> None:
        health = self._health.get(name)
        if health is None:  # an upstream removed by a reload
            return
        new = health.state(now=now)
        old = self.states.get(name)
        if new is not old:
            self.states[name] = new
            self.available += (new in AVAILABLE) - (old is not None and old in AVAILABLE)
            self.generation += 1
        wake = health.next_change_at(now=now)
        if wake is None:
            self._wake_at.pop(name, None)
        elif self._wake_at.get(name) != wake:
            self._wake_at[name] = wake
            heapq.heappush(self._wakes, (wake, name))

    def soonest_back(self, *, now: float) -> float | None:
        """When the first upstream that is not available now is expected back; None if
        every one is available. Call after ``refresh(now=now)``."""
        if self.available == len(self.states):
            return None
        if self._soonest_back is None:  # read once per change, not per request
            self._soonest_back = min(
                self._health[name].available_at(now=now)
                for name, state in self.states.items() if state not in AVAILABLE)
        return self._soonest_back
