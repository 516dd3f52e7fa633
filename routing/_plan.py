"""The attempt plan for one client request: which upstream next, and whether to go on.

Rules / theory of operation
---------------------------
* ``Router.plan`` orders the route's targets; ``AttemptPlan`` hands them out in
  that order. Each is *admitted* by its upstream (a half-open breaker admits only
  its probes, a bad key or a down upstream nothing). No upstream takes two
  attempts of one request.
* The panic rule (Envoy's ``max_ejection_percent``: a route never has all its
  upstreams ejected): when no target left admits the request, the least bad one
  not yet tried goes anyway, as a panic probe of its breaker: one at a time per
  upstream, and a success closes the breaker. The least bad is the one that
  failed here longest ago (it has had the most time to come back, whatever
  cool-down its trip streak gave it), then the one back soonest.
* Who is at fault decides retries (DeepSeek's documented errors): 400/422 are
  the client's and go back untouched; 401/402 are the key's or balance's, so the
  upstream leaves rotation and another is tried; 429, 5xx, connect errors,
  timeouts, busy keep-alives and cut answers are transient and another is tried.
* The budget rule: moving on to a target this request has not tried and that is
  sound (``UpstreamHealth.is_sound``: nothing says it is failing) is failover, at
  once and free, so a request never fails for want of budget while such a
  target is left. A retry that goes back to failing upstreams (a probe of an
  open breaker, the panic try) is paid from the route's retry budget (which
  keeps its Finagle-style floor) and waits a full-jitter backoff; with the
  budget spent the plan gives up instead of storming.
* Every give-up is 503 with ``Retry-After``; 504 once the route's deadline passed;
  429 when every attempt was rate-limited. ``Retry-After`` is when skyroute
  expects to try again (the soonest a target of the route is back), in whole
  seconds from 1 to ``MAX_RETRY_AFTER_S``, and the message says the same number.
* Nothing here does I/O or reads a clock: ``now`` is always an argument.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import final

from ._budget import RetryBudget
from ._errors import RoutingStateError
from ._health import UpstreamHealth
from ._pool_set import PoolPickers
from ._router_types import (
    RETRYABLE,
    AttemptOutcome,
    Decision,
    GiveUp,
    Respond,
    Result,
    Retry,
    Target,
)
from .config import Route

__all__ = ["MAX_RETRY_AFTER_S", "AttemptPlan", "retry_after_seconds"]

#: The longest Retry-After skyroute sends. Past it clients give up (the openai SDK waits at
#: most 60 s), while skyroute is still probing and would likely answer sooner.
MAX_RETRY_AFTER_S = 30


_RESPOND = Respond()  # it holds nothing: one serves every request


def retry_after_seconds(seconds: float) -> int:
    """Whole seconds for a ``Retry-After`` header: at least 1, at most ``MAX_RETRY_AFTER_S``."""
    return min(MAX_RETRY_AFTER_S, max(1, math.ceil(seconds)))


@final
class AttemptPlan:
    """The attempts for one client request over one route (see the module's rules)."""

    __slots__ = ("_backoff", "_budget", "_candidates", "_deadline", "_delays", "_failover",
                 "_health", "_hedge_budget", "_pools", "_tried", "_untried", "attempts", "hedged",
                 "outcomes", "paid_retries", "panics", "route")

    def __init__(self, route: Route, candidates: list[Target], *,
                 health: dict[str, UpstreamHealth], pools: PoolPickers, budget: RetryBudget,
                 hedge_budget: RetryBudget, backoff: Callable[[], Iterator[float]],
                 now: float) -> None:
        """Args:
            backoff: makes the delays between retries (called at the first delay only:
                most requests never wait).
        """
        self.route = route
        self._candidates = candidates
        self._untried = list(candidates)  # not yet offered an attempt, in plan order
        self._tried: set[str] = set()  # upstreams that took an attempt of this request
        self._health = health
        self._pools = pools
        self._budget = budget
        self._hedge_budget = hedge_budget
        self._backoff = backoff
        self._delays: Iterator[float] | None = None
        self.hedged = 0
        self._deadline = now + route.timeout_s
        self._failover = False  # the retry decided last was free: it goes to a sound target
        self.attempts = 0
        self.paid_retries = 0  # retries paid from the route's retry budget
        self.panics = 0  # attempts made by the panic rule
        self.outcomes: list[AttemptOutcome] = []

    def __repr__(self) -> str:
        tried = ", ".join(f"{o.target.name}:{o.result.value}" for o in self.outcomes)
        return f"<AttemptPlan route={self.route.model} attempts={self.attempts} [{tried}]>"

    @property
    def deadline(self) -> float:
        return self._deadline

    def next_attempt(self, *, now: float) -> Target | GiveUp:
        """The target for the next attempt, or ``GiveUp`` when none is left.

        The returned target has been admitted (for a pool, with the endpoint
        chosen now): feed its outcome to ``Router.record`` and ``record`` (or
        ``Router.cancel`` if the client went away).
        """
        if self.attempts >= self.route.max_attempts:
            return self._give_up(now)
        if now >= self._deadline:
            return self._give_up(now, timed_out=True)
        failover, self._failover = self._failover, False
        target = self._take(now, sound_only=failover)
        if target is None and failover:
            # What was sound a moment ago is not now: going on is a paid retry.
            if not self._budget.try_acquire(now):
                return self._give_up(now, budget_exhausted=True)
            self.paid_retries += 1
            target = self._take(now, sound_only=False)
        target = target or self._panic(now)
        if target is None:
            return self._give_up(now)
        self.attempts += 1
        return self._pools.admit(target, now=now)

    def _take(self, now: float, *, sound_only: bool) -> Target | None:
        """The first untried target that admits the attempt (``sound_only``: sound ones)."""
        untried, health_of = self._untried, self._health
        i = 0
        while i < len(untried):
            target = untried[i]
            health = health_of[target.name]
            if sound_only and not health.is_sound(now=now):
                i += 1
                continue  # kept for a paid retry
            del untried[i]
            if health.admit(now=now):
                self._tried.add(target.name)
                return target
        return None

    def _panic(self, now: float) -> Target | None:
        """The panic rule: no target admits, so the least bad one not tried yet goes.

        A route never has all its upstreams ejected (Envoy's ``max_ejection_percent``):
        one is tried anyway, as a panic probe of its breaker. The least bad is the one
        that failed here longest ago (never is longest): it has had the most time to come
        back, whatever cool-down its trip streak gave it; then the one back soonest.
        """
        def badness(target: Target) -> tuple[float, float]:
            health = self._health[target.name]
            failed = health.last_failure_at
            return (-math.inf if failed is None else failed, health.available_at(now=now))

        left = sorted((t for t in self._candidates if t.name not in self._tried), key=badness)
        for target in left:
            if self._health[target.name].admit(now=now, panic=True):
                self._tried.add(target.name)
                self.panics += 1
                return target
        return None

    def _can_go_on(self) -> bool:
        """Whether any target has not taken an attempt yet (in turn, or by the panic rule)."""
        return any(t.name not in self._tried for t in self._candidates)

    def hedge_delay(self, target: Target, *, now: float) -> float | None:
        """How long to wait for ``target``'s first token before hedging; None: never."""
        hedge_after = self.route.hedge_after
        if hedge_after is None or self.hedged or not self._untried:
            return None
        if hedge_after == "p95":
            return self._health[target.name].latency.p95(now=now) \
                or target.upstream.first_token_timeout_s / 2
        return float(hedge_after)

    def hedge(self, *, now: float) -> Target | None:
        """A second target for the same request, if the hedge budget allows one.

        Returns:
            an admitted target (feed its outcome, or ``Router.cancel`` it if it
            loses), or None when the budget is spent or no other upstream admits.
        """
        if self.attempts >= self.route.max_attempts or not self._hedge_budget.try_acquire(now):
            return None
        target = self._take(now, sound_only=False)
        if target is None:
            return None
        self.attempts += 1
        self.hedged += 1
        return self._pools.admit(target, now=now)

    def cancel(self, target: Target) -> None:
        """An admitted attempt lost a hedge race and was cancelled; it has no outcome."""
        self.attempts -= 1

    def record(self, outcome: AttemptOutcome, *, now: float) -> Decision:
        """Take the outcome of the attempt just made and say what to do next.

        Raises:
            RoutingStateError: if no attempt is outstanding; nothing changes.
        """
        if len(self.outcomes) >= self.attempts:
            raise RoutingStateError("record() called with no attempt outstanding") from None
        self.outcomes.append(outcome)
        if outcome.result not in RETRYABLE:
            return _RESPOND
        if self.attempts >= self.route.max_attempts or not self._can_go_on():
            return self._give_up(now)
        if now >= self._deadline:
            return self._give_up(now, timed_out=True)
        reason = f"{outcome.target.name}: {outcome.detail or outcome.result.value}"
        if any(self._health[t.name].is_sound(now=now) for t in self._untried):
            self._failover = True  # failover to a sound upstream: free, and at once
            return Retry(reason=reason)
        if outcome.result is Result.POOL_FULL:
            # Never left skyroute (its own connection limit): no load on any upstream, so
            # no budget is spent; the backoff lets a pooled connection come free.
            return Retry(reason=reason, delay_s=min(self._next_delay(),
                                                    max(0.0, self._deadline - now)))
        if not self._budget.try_acquire(now):
            return self._give_up(now, budget_exhausted=True)
        self.paid_retries += 1
        return Retry(reason=reason, paid=True,
                     delay_s=min(self._next_delay(), max(0.0, self._deadline - now)))

    def _next_delay(self) -> float:
        if self._delays is None:
            self._delays = self._backoff()
        return next(self._delays)

    def _give_up(self, now: float, *, timed_out: bool = False,
                 budget_exhausted: bool = False) -> GiveUp:
        """503 with Retry-After; 504 at the route's deadline; 429 if every attempt was."""
        model = self.route.model
        back = min((self._health[t.name].available_at(now=now) for t in self._candidates),
                   default=now)
        retry_after = retry_after_seconds(back - now)
        results = {o.result for o in self.outcomes}
        status = 504 if timed_out else 429 if results == {Result.RATE_LIMITED} else 503
        if not self.outcomes:
            states = ", ".join(f"{t.name} {self._health[t.name].state(now=now)}"
                               for t in self._candidates) or "no targets"
            why = "the request deadline passed" if timed_out else "no upstream is available"
            return GiveUp(status=status, retry_after_s=retry_after,
                          message=f"model '{model}': {why} ({states}). Retry after "
                                  f"{retry_after}s; skyroute's /health shows each upstream's "
                                  "state.")
        tried = "; ".join(f"{o.target.name}: {o.detail or o.result.value}" for o in self.outcomes)
        why = ("the retry budget is spent (the upstreams left are failing and recent requests "
               "have retried them too often)" if budget_exhausted
               else "the request deadline passed" if timed_out
               else "every upstream attempt was rate-limited" if status == 429
               else "every upstream attempt failed")
        return GiveUp(
            status=status, retry_after_s=retry_after, budget_exhausted=budget_exhausted,
            message=(f"model '{model}': {why} ({len(self.outcomes)} attempt(s): {tried}). "
                     f"Retry after {retry_after}s; skyroute's /health shows each "
                     "upstream's state."),
        )
