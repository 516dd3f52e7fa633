"""Choosing upstreams for a request, and deciding what to do after each attempt.

Rules / theory of operation
---------------------------
* ``Router`` lives as long as the process. ``update(config)`` swaps in a new
  configuration and keeps what it learnt about upstreams whose names stay, so a
  reload forgets no open circuit or latency history. A route's retry and hedge
  budgets go on too, unless the reload changed their settings (``retry.budget``,
  ``hedge_budget``, ``budget_window``): then they start empty with the new ones.
  The ``retry`` section's other settings, and a changed ``latency_threshold``,
  apply to kept upstreams at once.
* ``plan(route, now)`` orders the route's targets for one request:
  available and not slow first, ordered by the route's ``strategy``; then, under
  ``lowest-latency``, those with no latency known from any source (fewest
  requests in flight first, so a cold start spreads out), never taken for the
  fastest; then the slow ones, least slow first; then the unavailable ones,
  soonest back first. With probability ``latency.probe_share`` the first
  unknown one (else the least slow) goes first so it gets measured and
  recovery is seen, and an upstream just back from slow yields its place with
  probability ``1 - share`` while its recovery ramp runs.
* ``AttemptPlan`` (``routing._plan``) hands out targets in that order and decides
  after each attempt: failover, a paid retry, or giving up.
* A pool upstream (several ``endpoints``) is one candidate; which of its
  servers takes an attempt is decided when the attempt is admitted, from the
  servers' scraped load and health (``PoolPickers``, fed by ``feed_pool_*``).
  ``record`` and ``cancel`` end the attempt's count there.
* Degradation levels, and which route serves a request (its own, its fallback,
  or a refusal in minimal mode), come from ``_degradation.LevelView`` over every
  upstream's state, which ``_fleet.FleetStates`` keeps current as upstreams change
  (not per request). With ``degradation.reduced.hedging: false``, ``plan`` drops
  the route's ``hedge_after`` while the route is reduced or worse.
* The usual request takes a short way through ``_order``: every target healthy
  (``FleetStates``' view), none ramping back, a latency known for each under
  ``lowest-latency``. Then nothing is probed and nothing yields its place: the order is
  the strategy's alone, with no random draw, as the general way would give it.
* Per-config work is done once per config (``update``): each route's targets (a
  ``Target`` per upstream, with its model name), its retry budgets, the essential
  models. A request's routing costs O(targets of its route), whatever the fleet's size.
* Nothing here does I/O or reads a clock: ``now`` is always an argument, and
  randomness comes from an injected ``random.Random``.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import random
from collections.abc import Callable, Iterator
from typing import Any, final

from ._backoff import backoff_delays
from ._budget import RetryBudget
from ._degradation import (
    LEVELS,
    Level,
    LevelChange,
    LevelView,
    LevelWatch,
    MinimalTrigger,
    Refuse,
    Serve,
)
from ._fleet import FleetStates
from ._health import Estimate, HealthChange, UpstreamHealth, UpstreamState
from ._jobs import job_target_order
from ._plan import AttemptPlan, retry_after_seconds
from ._policies import Strategy
from ._pool import EndpointView, ServerLoad
from ._pool_set import EndpointChange, PoolPickers
from ._router_types import AttemptOutcome, GiveUp, Target
from .config import Config, Route, Upstream

#: The sort key of ``_order``'s (latency, name) pairs: the latency alone, as ``_estimate``.
_by_key = operator.itemgetter(0)

#: A Prometheus reading older than this many intervals is stale: passive wins.
STALE_INTERVALS = 3


#: An instance keeps exporting its last passive estimate of an upstream it stopped sending
#: to for this many passive windows (10 minutes by default): the other instances read it
#: through Prometheus, and a slow region stays known to all after traffic moved away.
PASSIVE_HOLD_WINDOWS = 10


#: Retries per second a route's retry budget always allows (Finagle's
#: ``minRetriesPerSec``): a quiet route can still retry.
RETRY_MIN_PER_S = 1.0
#: Hedges have a lower floor than retries: a quiet route may hedge once in 10 s.
HEDGE_MIN_PER_S = 0.1


def _budget_for(old: RetryBudget | None, *, ratio: float, window_s: float,
                min_per_s: float) -> RetryBudget:
    """``old``, its counts going on, when a reload left its settings as they were; else a
    new, empty budget with the new settings (counts over another window mean nothing)."""
    if old is not None and (old.ratio, old.window_s, old.min_per_s) == (
            ratio, window_s, min_per_s):
        return old
    return RetryBudget(ratio=ratio, window_s=window_s, min_per_s=min_per_s)


@dataclasses.dataclass(frozen=True, slots=True)
class _PreparedRoute:
    """What ``plan`` needs of one route, made once per config."""

    targets: tuple[str, ...]  # the route's, to check a Route passed in against
    by_name: dict[str, Target]  # each target upstream's (and job target's) Target
    job_targets: tuple[str, ...]  # jobs.targets for this alias: upstreams jobs try first
    budget: RetryBudget
    hedge_budget: RetryBudget


@final
class Router:
    """Routing decisions for the configuration being served."""

    def __init__(self, config: Config, *, rng: random.Random | None = None) -> None:
        self._rng = rng if rng is not None else random.Random()
        self._health: dict[str, UpstreamHealth] = {}
        self._budgets: dict[str, RetryBudget] = {}
        self._hedge_budgets: dict[str, RetryBudget] = {}
        self._pools = PoolPickers()
        self._level_watch = LevelWatch()
        self._fleet = FleetStates()
        self._view: tuple[int, LevelView] | None = None  # (fleet generation, view)
        self.config = config
        self.update(config)

    def __repr__(self) -> str:
        return f"<Router routes={sorted(self._routes)} upstreams={sorted(self._health)}>"

    def update(self, config: Config) -> None:
        """Serve ``config`` from now on, keeping what is known of unchanged upstreams."""
        thresholds: dict[str, float] = {}
        for route in config.routes:
            for name in route.targets:  # the strictest threshold of any route using it
                thresholds[name] = min(thresholds.get(name, 1e9), route.latency_threshold_s)
        # Pool scrape settings are not upstream health: changing them forgets nothing.
        latency = dataclasses.replace(self.config.latency, scrape=config.latency.scrape)
        same_policies = self.config.breaker == config.breaker and latency == config.latency
        health = {}
        for upstream in config.upstreams:
            old = self._health.get(upstream.name)
            health[upstream.name] = old if same_policies and old is not None else UpstreamHealth(
                upstream.name, breaker=config.breaker, latency=config.latency,
                retry=config.retry, threshold_s=thresholds.get(upstream.name, 0.2))
        for name, kept in health.items():  # settings that hold no state: apply them
            kept.retry = config.retry
            kept.slow.set_threshold(thresholds.get(name, 0.2))
        self._health = health
        retry = config.retry
        self._budgets = {route.model: _budget_for(
            self._budgets.get(route.model), ratio=retry.budget,
            window_s=retry.budget_window_s, min_per_s=RETRY_MIN_PER_S)
            for route in config.routes}
        self._hedge_budgets = {route.model: _budget_for(
            self._hedge_budgets.get(route.model), ratio=retry.hedge_budget,
            window_s=retry.budget_window_s, min_per_s=HEDGE_MIN_PER_S)
            for route in config.routes}
        self._routes = {route.model: route for route in config.routes}
        self._upstreams = {u.name: u for u in config.upstreams}
        self._pools.update(config.upstreams, config.latency.scrape)
        job_targets = config.jobs.targets if config.jobs is not None else {}
        self._prepared = {route.model: _PreparedRoute(
            targets=route.targets,
            by_name={name: self._target(self._upstreams[name], route.model)
                     for name in (*route.targets, *job_targets.get(route.model, ()))
                     if name in self._upstreams},
            job_targets=tuple(n for n in job_targets.get(route.model, ()) if n in self._upstreams),
            budget=self._budgets[route.model], hedge_budget=self._hedge_budgets[route.model],
        ) for route in config.routes}
        self._essential = tuple(route.model for route in config.routes if route.essential)
        # Made when a request first waits between attempts: most never do.
        self._backoff: Callable[[], Iterator[float]] = functools.partial(
            backoff_delays, base_s=config.retry.backoff_base_s,
            cap_s=config.retry.backoff_cap_s, rng=self._rng)
        self.config = config
        self._fleet.reset(health)
        self._view = None

    @property
    def models(self) -> list[str]:
        """Every model alias a client may ask for."""
        return list(self._routes)

    def route_for(self, model: str) -> Route | None:
        return self._routes.get(model)

    def default_route(self) -> Route | None:
        """The route for requests that name no model (the first one in the file)."""
        return self.config.routes[0] if self.config.routes else None

    def health(self, name: str) -> UpstreamHealth:
        return self._health[name]

    def plan(self, route: Route, *, now: float, prefer: str | None = None,
             pinned: str | None = None, job: bool = False) -> AttemptPlan:
        """An ``AttemptPlan`` for one request over ``route``.

        Args:
            prefer: the upstream the request's session is pinned to (affinity keeps a
                conversation where its prompt cache is); honoured while it is healthy.
            pinned: the upstream holding an object the request names (a file, a
                stored response): the only candidate, since no other upstream has
                the object. It need not be one of the route's targets.
            job: the request is a job's (``jobs.targets``: its preferred upstreams first,
                ``routing._jobs.job_target_order``).
        """
        if route.hedge_after is not None and not self.config.degradation.reduced_hedging \
                and self.route_level(route, now=now) is not Level.NORMAL:
            route = dataclasses.replace(route, hedge_after=None)  # reduced.hedging: false
        prepared = self._prepared[route.model]
        if prepared.targets is not route.targets and prepared.targets != route.targets:
            # a Route of another config's (a reload)
            prepared = dataclasses.replace(prepared, targets=route.targets, by_name={
                name: self._target(self._upstreams[name], route.model)
                for name in (*route.targets, *prepared.job_targets) if name in self._upstreams})
        prepared.budget.record_request(now)
        prepared.hedge_budget.record_request(now)
        order = [pinned] if pinned is not None and pinned in self._upstreams \
            else self._order(route, now)
        if prefer is not None and prefer in order \
                and self._health[prefer].state(now=now) is UpstreamState.HEALTHY:
            order.remove(prefer)
            order.insert(0, prefer)
        if job and prepared.job_targets and pinned is None:
            order = job_target_order(prepared.job_targets, order, available=functools.partial(
                self._available, now=now))
        by_name = prepared.by_name
        candidates = [by_name[name] if name in by_name
                      else self._target(self._upstreams[name], route.model) for name in order]
        return AttemptPlan(route, candidates, health=self._health, pools=self._pools,
                           budget=prepared.budget, hedge_budget=prepared.hedge_budget,
                           backoff=self._backoff, now=now)

    def _available(self, name: str, *, now: float) -> bool:
        return self._health[name].is_available(now=now)

    def job_targets(self, model: str) -> tuple[str, ...]:
        """The upstreams jobs for ``model`` try first (``jobs.targets``); () if none."""
        prepared = self._prepared.get(model)
        return prepared.job_targets if prepared is not None else ()

    def pinned_unavailable(self, upstream: str, object_id: str, *,
                           now: float) -> GiveUp | None:
        """A 503 when the upstream holding ``object_id`` is out; None while it is available.

        No other upstream has the object, so failing over would only turn the outage
        into the other provider's 404.
        """
        health = self._health.get(upstream)
        if health is None or health.is_available(now=now):
            return None
        retry_after = retry_after_seconds(health.available_at(now=now) - now)
        return GiveUp(status=503, retry_after_s=retry_after,
                      message=f"'{object_id}' is held by upstream '{upstream}', which is "
                              f"{health.state(now=now)} now; only that upstream has it, so "
                              f"retry after {retry_after}s (skyroute's /health shows "
                              "its state)")

    def _order(self, route: Route, now: float) -> list[str]:
        """The route's targets in the order ``plan`` tries them (see the module's rules).

        The usual request takes a short way: every target healthy (the fleet's states, kept
        current by events), none ramping back and, under ``lowest-latency``, each with a
        latency known. Then nothing is probed, nothing yields its place and no random draw
        is made, so the order is the strategy's alone; anything else takes
        ``_order_general``, which gives the same order for such a route
        (``tests/test_routing_plan_fast.py`` checks it after random event sequences).
        """
        fleet = self._fleet
        fleet.refresh(now=now)
        states, health_of = fleet.states, self._health
        by_latency = route.strategy == Strategy.LOWEST_LATENCY
        keyed: list[tuple[float, str]] = []
        for name in route.targets:
            health = health_of[name]
            if states.get(name) is not UpstreamState.HEALTHY \
                    or health.ramp.started_at is not None:
                return self._order_general(route, now)
            if by_latency:  # the key _estimate gives
                estimate = health.estimate
                if estimate is not None:
                    keyed.append((estimate.seconds, name))
                elif (ewma := health.latency.ewma) is not None:
                    keyed.append((ewma, name))
                else:  # no latency known: it gets the probe share
                    return self._order_general(route, now)
        if not by_latency:  # none ramping: no place to yield
            return self._strategy_order(route, list(route.targets), now)
        if len(keyed) > 1:
            keyed.sort(key=_by_key)  # stable, comparing the keys alone, as sorted(key=) does
        return [name for _, name in keyed]

    def _order_general(self, route: Route, now: float) -> list[str]:
        fast: list[str] = []
        unknown: list[str] = []
        slow: list[str] = []
        out: list[str] = []
        by_latency = route.strategy == Strategy.LOWEST_LATENCY
        for name in route.targets:
            health = self._health[name]
            state = health.state(now=now)
            if state is UpstreamState.HEALTHY:
                # With no latency known from any source it is no fastest: it gets the probe
                # share until it has an estimate.
                (fast if health.has_estimate() or not by_latency else unknown).append(name)
            else:
                (slow if state is UpstreamState.SLOW else out).append(name)
        fast = self._by_strategy(route, fast, now)
        unknown.sort(key=lambda n: self._health[n].outstanding)  # a cold start spreads out
        slow.sort(key=lambda n: self._estimate(n))
        probed = unknown or slow
        if probed and fast and self._rng.random() < self.config.latency.probe_share:
            fast.insert(0, probed.pop(0))  # a probe keeps measuring what is unknown or slow
        out.sort(key=lambda n: self._health[n].available_at(now=now))
        return fast + unknown + slow + out

    def _strategy_order(self, route: Route, names: list[str], now: float) -> list[str]:
        if route.strategy == Strategy.LOWEST_LATENCY:
            return sorted(names, key=self._estimate)
        if route.strategy == Strategy.LEAST_OUTSTANDING:
            return sorted(names, key=lambda n: self._health[n].outstanding)
        if route.strategy == Strategy.WEIGHTED:
            return self._weighted_order(names, now)
        return names

    def _by_strategy(self, route: Route, names: list[str], now: float) -> list[str]:
        names = self._strategy_order(route, names, now)
        # An upstream back from slow yields its place while its ramp runs (no draw for
        # the others: a share of 1 always keeps its place).
        rng, health = self._rng, self._health
        ramping = [n for n in names
                   if (share := health[n].share(now=now)) < 1.0 and rng.random() >= share]
        if not ramping:
            return names
        return [n for n in names if n not in ramping] + ramping

    def _weighted_order(self, names: list[str], now: float) -> list[str]:
        pool = {n: float(self._upstreams[n].weight) for n in names}
        order = []
        while pool:
            pick = self._rng.choices(list(pool), weights=list(pool.values()))[0]
            order.append(pick)
            del pool[pick]
        return order

    def _estimate(self, name: str) -> float:
        health = self._health[name]
        if health.estimate is not None:
            return health.estimate.seconds
        return health.latency.ewma or 0.0

    def _target(self, upstream: Upstream, alias: str) -> Target:
        # A pool's endpoint is chosen when the attempt is admitted (PoolPickers.admit).
        return Target(upstream=upstream, endpoint=upstream.endpoints[0],
                      model=upstream.model_for(alias))

    def record(self, outcome: AttemptOutcome, *, now: float) -> HealthChange | None:
        """Feed the outcome of an admitted attempt into its upstream's health."""
        self._pools.end(outcome.target)
        health = self._health.get(outcome.target.name)
        return health.record(outcome, now=now) if health is not None else None

    def cancel(self, target: Target, *, now: float, waited_s: float | None = None) -> None:
        """An admitted attempt ended with no outcome.

        Args:
            waited_s: for an attempt that lost a hedge race, how long it went without
                a first token. That is a lower bound of its time to first token and
                is recorded as a latency sample: an upstream that keeps losing races
                (busy, say) must not keep looking fast. None when the client went away.
        """
        self._pools.end(target)
        health = self._health.get(target.name)
        if health is not None:
            health.cancel(now=now)
            if waited_s is not None:
                health.latency.record(waited_s, now=now)

    def feed_external(self, upstream: str, seconds: float, *, source: str, now: float) -> None:
        """A latency reading from outside (Prometheus); used by ``tick`` while fresh."""
        health = self._health.get(upstream)
        if health is not None:
            health.external = Estimate(seconds=seconds, source=source, at=now)

    @property
    def scraped_pools(self) -> tuple[Upstream, ...]:
        """The pool upstreams whose servers the proxy scrapes and health-checks."""
        return self._pools.scraped

    def feed_pool_load(self, upstream: str, endpoint: str, load: ServerLoad | None, *,
                       now: float) -> None:
        """A scrape of one pool endpoint's ``/metrics`` (``None``: it exports no load)."""
        self._pools.feed_load(upstream, endpoint, load, now=now)

    def feed_pool_health(self, upstream: str, endpoint: str, ok: bool, *,
                         now: float) -> EndpointChange | None:
        """An active health check of one pool endpoint.

        Returns:
            the change when the endpoint leaves or rejoins its pool, else None.
        """
        return self._pools.feed_health(upstream, endpoint, ok, now=now)

    def pool_snapshot(self, *, now: float) -> dict[str, tuple[EndpointView, ...]]:
        """Every pool upstream's endpoints as its picker sees them."""
        return self._pools.snapshot(now=now)

    def mark(self, upstream: str, state: UpstreamState, *, until: float, reason: str,
             now: float) -> HealthChange | None:
        """An outside report about an upstream (a peer found it down or its key bad)."""
        health = self._health.get(upstream)
        return health.mark(state, until=until, reason=reason, now=now) if health else None

    def tick(self, *, now: float) -> list[HealthChange]:
        """Re-evaluate every upstream's latency estimate; call once per interval."""
        changes = []
        stale_after = self._stale_after()
        hold_s = PASSIVE_HOLD_WINDOWS * self.config.latency.passive_window_s
        for health in self._health.values():
            passive = health.update_passive(now=now, hold_s=hold_s)
            external = health.external
            change = None
            if external is not None and now - external.at <= stale_after:
                change = health.feed_estimate(external, now=now)
            elif passive is not None:
                change = health.feed_estimate(passive, now=now)
            change = change or health.refresh(now=now)
            if change is not None:
                changes.append(change)
        return changes

    def _stale_after(self) -> float:
        """Age past which a Prometheus reading no longer counts."""
        source = self.config.latency.prometheus
        return STALE_INTERVALS * (source.interval_s if source else 0.0)

    def exported_estimates(self, *, now: float) -> dict[str, dict[str, float]]:
        """Per upstream, the latency estimates to export, in seconds, by source.

        ``passive`` is this instance's own (held after its traffic there stops; see
        ``PASSIVE_HOLD_WINDOWS``), the one the default Prometheus query aggregates;
        ``prometheus`` is the reading from Prometheus while it is fresh. Never an
        estimate that came back from Prometheus under ``passive``: instances that
        re-exported what they read would keep one another's old readings alive.
        """
        stale_after = self._stale_after()
        result: dict[str, dict[str, float]] = {}
        for name, health in self._health.items():
            entry = result[name] = {}
            if health.passive is not None:
                entry["passive"] = health.passive.seconds
            if health.external is not None and now - health.external.at <= stale_after:
                entry["prometheus"] = health.external.seconds
        return result

    def _levels(self, now: float) -> LevelView:
        fleet = self._fleet
        fleet.refresh(now=now)
        if self._view is None or self._view[0] != fleet.generation:
            self._view = (fleet.generation, LevelView(
                self.config.degradation, self._routes, fleet.states,
                available=fleet.available, essential=self._essential))
        return self._view[1]

    def route_level(self, route: Route, *, now: float) -> Level:
        """One of ``LEVELS`` for one route (see ``routing._degradation``)."""
        return self._levels(now).level(route)

    def route_levels(self, *, now: float) -> dict[str, Level]:
        """Every route's level (model -> level), from one look at upstream states."""
        view = self._levels(now)
        return {route.model: view.level(route) for route in self.config.routes}

    def level(self, *, now: float) -> Level:
        """The worst level over every route."""
        return max(self.route_levels(now=now).values(), key=LEVELS.index, default=Level.NORMAL)

    def minimal(self, *, now: float) -> MinimalTrigger:
        """Whether the instance is in ``minimal`` mode, and why."""
        return self._levels(now).minimal

    def serving(self, route: Route, *, n: int | None, now: float) -> Serve | Refuse:
        """Which route serves a request for ``route`` now, with what cap, or a refusal.

        Args:
            n: the number of choices the request asks for (None: not given).
        """
        fleet = self._fleet  # _levels, inline: a call fewer on every request
        fleet.refresh(now=now)
        cached = self._view
        view = cached[1] if cached is not None and cached[0] == fleet.generation \
            else self._levels(now)
        if not view.minimal.active:  # no refusal: no Retry-After to work out
            return view.serving(route, n=n, retry_after_s=1)
        back = self._fleet.soonest_back(now=now)
        retry_after = retry_after_seconds(back - now) if back is not None else 1  # refusals
        return view.serving(route, n=n, retry_after_s=retry_after)

    def fallbacks(self, *, now: float) -> dict[str, str]:
        """Each route served by its fallback now (level ``fallback``) -> the fallback's model."""
        view = self._levels(now)
        serving = {route.model: view.serving_route(route) for route in self.config.routes}
        return {model: route.model for model, route in serving.items() if route.model != model}

    def fallback_after_failure(self, route: Route, *, deadline: float,
                               now: float) -> Route | None:
        """The route to try once after every attempt over ``route`` failed, or None.

        Returns:
            the fallback route with its timeout cut to what is left of ``deadline``
            (the request's), or None: no fallback configured or available, or no
            time left.
        """
        fallback = self._levels(now).fallback(route)
        if fallback is None or deadline - now <= 0:
            return None
        return dataclasses.replace(fallback, timeout_s=min(fallback.timeout_s, deadline - now))

    def level_changes(self, *, now: float) -> list[LevelChange]:
        """Each route whose level changed since the last call, once."""
        return self._level_watch.changes(self._levels(now), self.config.routes, now=now)

    def snapshot(self, *, now: float) -> dict[str, dict[str, Any]]:
        """Every upstream's state and latency estimate, for /health and /admin."""
        result = {}
        pools = self._pools.snapshot(now=now)
        for name, health in self._health.items():
            upstream = self._upstreams[name]
            entry: dict[str, Any] = {
                "state": health.state(now=now), "region": upstream.region,
                "outstanding": health.outstanding, "breaker": health.breaker.state(now=now).name,
            }
            if health.estimate is not None:
                entry["latency_ms"] = round(health.estimate.seconds * 1000, 1)
                entry["latency_source"] = health.estimate.source
            until = health.available_at(now=now)
            if until > now:
                entry["until_s"] = round(until - now, 1)
            if health.last_change is not None:
                entry["last_change"] = health.last_change.reason
            if name in pools:
                entry["endpoints"] = {view.endpoint: _endpoint_entry(view)
                                      for view in pools[name]}
            result[name] = entry
        return result


def _endpoint_entry(view: EndpointView) -> dict[str, Any]:
    """One pool endpoint for /health and /admin: its state and the load it reported."""
    load = view.load if view.fresh else None
    return {
        "healthy": view.healthy, "failed_checks": view.failed_checks,
        "in_flight": view.in_flight, "picks": view.picks,
        "waiting": None if load is None else load.waiting,
        "running": None if load is None else load.running,
        "kv_cache_usage": None if load is None else load.kv_cache_usage,
        "metrics_age_s": None if view.load_age_s is None else round(view.load_age_s, 1),
        "cost": view.cost,
    }
