"""What skyroute knows about one upstream's health, fed by attempt outcomes and estimates.

Rules / Theory of operation
---------------------------
``UpstreamHealth`` joins the per-upstream machines into one answer, ``state``:

=========  ==============================================================
state      meaning (first that applies wins)
=========  ==============================================================
bad_key    a 401/402 said its key or balance is bad; out for a long time
down       its circuit is open after failures with no answer at all
           (connect errors), or another instance reported it down
open       its circuit is open (errors, timeouts, busy, 429 Retry-After)
slow       its latency estimate is above the route's threshold
healthy    none of the above
=========  ==============================================================

``is_available`` is "may get a normal request now": not bad_key, not down, and
the breaker's cool-down has passed (a half-open breaker admits a probe). Slow
upstreams are available but ordered last by the router. ``is_sound`` is
stricter: available with a closed breaker, so a request that moves there after
a failure elsewhere is failover, not a retry against a failing upstream.

``admit`` takes a request for an available upstream. With ``panic`` (the
router's panic rule: nothing else is left for the route) it also takes one for
an upstream that is out: an open breaker admits it as a panic probe (one at a
time), whose success closes the breaker, so that ``state`` says what requests
see.

Outcomes map to the breaker as: SUCCESS and CLIENT_ERROR (the upstream
answered) are successes; BAD_KEY sets ``bad_key_until``; RATE_LIMITED and a
Retry-After on a 5xx trip the breaker until that time; every other failure is a
breaker failure. A BUSY attempt also records its wait as a latency sample, so a
busy upstream looks slow as well as failing.

Every change of ``state`` is returned as a ``HealthChange`` so the shell can log
it and update metrics. A watcher (``watch``: the router's fleet view) is told the
name whenever an event may have changed ``state``; between events it changes only at
``next_change_at`` (a cool-down ending). Time is the ``now`` argument; nothing here
reads a clock.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import final

from ._breaker import BreakerState, CircuitBreaker, Outcome
from ._latency import LatencyTracker, SlowDetector, SlowState
from ._router_types import AttemptOutcome, Result
from .config import BreakerPolicy, LatencyPolicy, RetryPolicy


class UpstreamState(enum.StrEnum):
    """What an upstream can do for a request now (string-valued: JSON and labels use it as is)."""

    HEALTHY = "healthy"
    SLOW = "slow"
    OPEN = "open"
    BAD_KEY = "bad_key"
    DOWN = "down"


STATES = tuple(UpstreamState)
#: States that may take a normal request (slow ones are ordered last).
AVAILABLE = frozenset({UpstreamState.HEALTHY, UpstreamState.SLOW})

_NO_ANSWER = frozenset({Result.CONNECT_ERROR})


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthChange:
    """An upstream's state changed; ``reason`` is short (the ``reason`` field of the log event)."""

    upstream: str
    old: UpstreamState
    new: UpstreamState
    reason: str
    at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Estimate:
    """A latency estimate and where it came from (``passive`` or ``prometheus``)."""

    seconds: float
    source: str
    at: float


@final
class UpstreamHealth:
    """Health of one upstream: breaker, latency, bad key, Retry-After, in-flight count."""

    def __init__(self, name: str, *, breaker: BreakerPolicy, latency: LatencyPolicy,
                 retry: RetryPolicy, threshold_s: float) -> None:
        self.name = name
        #: Read at each outcome (bad-key cooldown, default Retry-After) and holding no
        #: state, so a reload that keeps this upstream's health replaces it.
        self.retry = retry
        self.breaker = CircuitBreaker(
            name, consecutive_failures=breaker.consecutive_failures,
            failure_rate=breaker.failure_rate, min_requests=breaker.min_requests,
            window_s=breaker.window_s, base_cooldown_s=breaker.cooldown_s,
            max_cooldown_s=breaker.max_cooldown_s)
        self.latency = LatencyTracker(window_s=latency.passive_window_s)
        self.slow = SlowDetector(threshold_s=threshold_s, recover_ratio=latency.recover_ratio,
                                 recover_intervals=latency.recover_intervals,
                                 ramp_s=latency.ramp_s)
        #: Its recovery ramp: the router reads ``ramp.started_at`` (None: no ramp runs, the
        #: share is 1.0) per request instead of calling ``share``.
        self.ramp = self.slow.ramp
        self._bad_key_until: float | None = None
        self._down_until: float | None = None  # no answer at all, or a peer's report
        #: Called with the name whenever ``state`` may have changed other than by time
        #: passing ``next_change_at`` (see ``watch``).
        self._on_change: Callable[[str], None] | None = None
        self.breaker.on_change = self._changed_state
        self.estimate: Estimate | None = None  # the one routing uses
        self.external: Estimate | None = None  # the latest Prometheus reading
        self.passive: Estimate | None = None  # this instance's own, for the others to read
        self.outstanding = 0
        self.last_failure_at: float | None = None  # of an attempt of this instance's
        self.last_success_at: float | None = None  # of an attempt of this instance's
        self.reported_at: float | None = None  # when a peer's report last marked it
        self.last_change: HealthChange | None = None
        self._last_state = UpstreamState.HEALTHY

    def __repr__(self) -> str:
        return f"<UpstreamHealth {self.name} {self._last_state} outstanding={self.outstanding}>"

    def watch(self, on_change: Callable[[str], None] | None) -> None:
        """Call ``on_change(name)`` whenever ``state`` may have changed by an event (an
        outcome, a report, an estimate, the breaker moving). Between events ``state``
        changes only at ``next_change_at``, so a watcher can keep it current in O(1)."""
        self._on_change = on_change

    def _changed_state(self) -> None:
        if self._on_change is not None:
            self._on_change(self.name)

    @property
    def bad_key_until(self) -> float | None:
        """Until when a 401/402 (or a peer's report) keeps it out as ``bad_key``."""
        return self._bad_key_until

    @bad_key_until.setter
    def bad_key_until(self, until: float | None) -> None:
        if until != self._bad_key_until:
            self._bad_key_until = until
            self._changed_state()

    @property
    def down_until(self) -> float | None:
        """Until when no answer at all (or a peer's report) keeps it out as ``down``."""
        return self._down_until

    @down_until.setter
    def down_until(self, until: float | None) -> None:
        if until != self._down_until:
            self._down_until = until
            self._changed_state()

    def state(self, *, now: float) -> UpstreamState:
        """The upstream's state now; see the module docstring for the order."""
        if self._bad_key_until is not None and now < self._bad_key_until:
            return UpstreamState.BAD_KEY
        if self._down_until is not None and now < self._down_until:
            return UpstreamState.DOWN
        if self.breaker.state(now=now) is BreakerState.OPEN:
            return UpstreamState.OPEN
        if self.slow.state is SlowState.SLOW:
            return UpstreamState.SLOW
        return UpstreamState.HEALTHY

    def is_available(self, *, now: float) -> bool:
        """True if a normal request may go here now (slow upstreams included)."""
        return self.state(now=now) in AVAILABLE

    def available_at(self, *, now: float) -> float:
        """When this upstream is next expected to take requests (``now`` if already)."""
        times = [t for t in (self._bad_key_until, self._down_until, self.breaker.open_until)
                 if t is not None and t > now]
        return max(times) if times else now

    def next_change_at(self, *, now: float) -> float | None:
        """The next time after ``now`` at which ``state`` changes with no event (a bad
        key's, a down report's or a breaker's cool-down ending); None: not by time."""
        times = [t for t in (self._bad_key_until, self._down_until, self.breaker.open_until)
                 if t is not None and t > now]
        return min(times) if times else None

    def share(self, *, now: float) -> float:
        """Traffic share from slowness: 0 while slow, ramping back after recovery."""
        return self.slow.share(now=now)

    def is_sound(self, *, now: float) -> bool:
        """True if available with a closed breaker: nothing says it is failing."""
        return self.is_available(now=now) and \
            self.breaker.state(now=now) is BreakerState.CLOSED

    def admit(self, *, now: float, panic: bool = False) -> bool:
        """Take one request (reserving a probe slot if the breaker needs one).

        Args:
            panic: the route has nothing else left: take it even though this
                upstream is out (an open breaker admits one panic probe at a time).

        Returns:
            True if the request may go; the caller then records its outcome or cancels.
        """
        if not panic:  # out while state() is bad_key or down (those come first there)
            bad_key_until, down_until = self._bad_key_until, self._down_until
            if (bad_key_until is not None and now < bad_key_until) or (
                    down_until is not None and now < down_until):
                return False
        if self.breaker.allows(now=now, panic=panic):
            self.outstanding += 1
            return True
        return False

    def record(self, outcome: AttemptOutcome, *, now: float) -> HealthChange | None:
        """Feed the outcome of an attempt admitted earlier."""
        result = outcome.result
        if result is Result.POOL_FULL:  # never reached the upstream: no outcome for it
            self.cancel(now=now)
            return None
        self.outstanding = self.outstanding - 1 if self.outstanding > 0 else 0
        if result is Result.SUCCESS:  # the usual outcome: a setter only to undo bad news
            if outcome.ttfb_s is not None:
                self.latency.record(outcome.ttfb_s, now=now)
            self.last_success_at = now
            self.breaker.record(Outcome.SUCCESS, now=now)
            if self._down_until is not None:
                self.down_until = None
            if self._bad_key_until is not None:  # a panic try got an answer: the key works
                self.bad_key_until = None
        elif result is Result.CLIENT_ERROR:  # the upstream answered: a breaker success
            self.breaker.record(Outcome.SUCCESS, now=now)
            self.down_until = None
        else:
            self._record_failure(outcome, now)
        if self.state(now=now) is self._last_state:  # the usual case: no reason to format
            return None
        return self._changed(now, f"{result.value}: {outcome.detail or result.value}")

    def _record_failure(self, outcome: AttemptOutcome, now: float) -> None:
        """``record`` of an outcome that is no breaker success (nor POOL_FULL)."""
        result = outcome.result
        self.last_failure_at = now
        if result is Result.BAD_KEY:
            self.bad_key_until = now + self.retry.bad_key_cooldown_s
        elif outcome.retry_after_s is not None or result is Result.RATE_LIMITED:
            wait = outcome.retry_after_s or self.retry.default_retry_after_s
            self.breaker.trip(now=now, until=now + wait, reason=f"Retry-After {wait:g}s")
        else:
            if result is Result.BUSY and outcome.ttfb_s is not None:
                self.latency.record(outcome.ttfb_s, now=now)
            self.breaker.record(Outcome.FAILURE, now=now)
            if result in _NO_ANSWER and self.breaker.state(now=now) is BreakerState.OPEN:
                self.down_until = self.breaker.open_until

    def cancel(self, *, now: float) -> None:
        """An admitted request ended without an outcome (the client went away)."""
        self.outstanding = max(0, self.outstanding - 1)
        if self.breaker.has_probe_out():
            self.breaker.abandon_probe(now=now)

    def update_passive(self, *, now: float, hold_s: float) -> Estimate | None:
        """Refresh ``passive``, this instance's own estimate, from its samples.

        Args:
            hold_s: how long the last estimate is kept once the window has no samples
                (the upstream gets no traffic here), so other instances still read it.

        Returns:
            the new estimate while the window has samples, else None.
        """
        p95 = self.latency.p95(now=now)
        if p95 is not None:
            self.passive = Estimate(seconds=p95, source="passive", at=now)
            return self.passive
        if self.passive is not None and now - self.passive.at > hold_s:
            self.passive = None
        return None

    def has_estimate(self) -> bool:
        """Whether any latency is known: an estimate, or at least one sample of its own."""
        return self.estimate is not None or self.latency.ewma is not None

    def feed_estimate(self, estimate: Estimate, *, now: float) -> HealthChange | None:
        """Feed a latency estimate (one per evaluation interval)."""
        self.estimate = estimate
        transition = self.slow.feed(estimate.seconds, source=estimate.source, now=now)
        if transition is None:
            return None
        self._changed_state()
        return self._changed(now, transition.reason)

    def is_answering(self) -> bool:
        """True if the latest news of it here is an answer: a success after any failure here
        and after any peer's report. A bad_key or down report older than that is out of date.
        """
        bad_news = [t for t in (self.last_failure_at, self.reported_at) if t is not None]
        return self.last_success_at is not None and self.last_success_at > max(
            bad_news, default=float("-inf"))

    def mark(self, state: UpstreamState, *, until: float, reason: str,
             now: float) -> HealthChange | None:
        """Take an outside report (a peer found it down or its key bad); other states
        are not reported from outside and change nothing."""
        self.reported_at = now
        if state is UpstreamState.BAD_KEY:
            self.bad_key_until = max(until, self.bad_key_until or 0.0)
        elif state is UpstreamState.DOWN:
            self.down_until = max(until, self.down_until or 0.0)
        return self._changed(now, reason)

    def _changed(self, now: float, reason: str) -> HealthChange | None:
        new = self.state(now=now)
        if new == self._last_state:
            return None
        change = HealthChange(upstream=self.name, old=self._last_state, new=new,
                              reason=reason, at=now)
        self._last_state = new
        self.last_change = change
        return change

    def refresh(self, *, now: float) -> HealthChange | None:
        """Notice time-driven changes (a cool-down ending) and report them."""
        return self._changed(now, "cool-down over")
