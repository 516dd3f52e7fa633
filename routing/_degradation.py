"""Degradation levels: how much service each route gets, and what is switched off.

Rules / theory of operation
---------------------------
Upstream states go in (``healthy`` and ``slow`` are *available*); levels, the
route that serves a request, and refusals come out. ``LEVELS`` lists the levels
best first; a level's index is the ``skyroute_degradation_level`` gauge.

===========  ===================================================================
level        a route is at it when (the first row, from the bottom, that applies)
===========  ===================================================================
normal       its first target is healthy
reduced      its first target is not healthy, but another target is available
fallback     none of its targets is available, but a route along its
             ``fallback_model`` chain has an available target: that route serves
minimal      instance-wide: some route is marked ``essential`` and fewer than
             ``degradation.minimal.when_available_below`` of *all* upstreams are
             available
unavailable  none of its targets is available and no fallback can serve
===========  ===================================================================

* ``minimal`` overrides ``normal``, ``reduced`` and ``fallback`` for every route
  (an ``unavailable`` route stays so): only routes marked ``essential`` are
  served, still from their fallback when their own targets are out; their
  ``max_tokens`` is capped and ``n`` above ``max_n`` refused. Other routes are
  refused with a 503 that says why and which models are essential. With no
  route marked essential there is nothing to keep, so ``minimal`` never starts:
  a file that does not use it loses no traffic to it.
* ``degradation.fallback.enabled: false`` removes the ``fallback`` row: such a
  route goes from ``reduced`` to ``unavailable``. ``degradation.reduced.hedging:
  false`` stops hedging while a route is ``reduced`` or worse (``Router.plan``).
* A fallback chain is followed to the first route with an available target;
  config validation guarantees it never loops (a guard stops it anyway).
* ``LevelWatch`` turns successive evaluations into ``LevelChange`` values, one
  per change, so the shell logs each change once (as with ``HealthChange``).
* In ``minimal`` mode a served request's token limits are capped
  (``capped_payload``): only generation requests, only limits above the cap, and
  ``max_tokens`` added when the request sets none.
* Nothing here reads a clock or holds health: ``LevelView`` reads the states the
  router passes in (``routing._fleet`` keeps them current as upstreams change, so
  no request walks the fleet) and costs a request O(targets) of its route.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, final

from ._health import AVAILABLE, UpstreamState
from ._policies import DegradationPolicy
from .config import Route


class Level(enum.StrEnum):
    """A route's degradation level (string-valued: JSON and labels use it as is)."""

    NORMAL = "normal"
    REDUCED = "reduced"
    FALLBACK = "fallback"
    MINIMAL = "minimal"
    UNAVAILABLE = "unavailable"


#: Degradation levels, best first.
LEVELS = tuple(Level)


@dataclass(frozen=True, slots=True, kw_only=True)
class MinimalTrigger:
    """Whether ``minimal`` mode is on, and the numbers that decided it."""

    active: bool
    available: int  # upstreams healthy or slow
    upstreams: int  # all upstreams of the instance
    below: float  # degradation.minimal.when_available_below
    essential: tuple[str, ...]  # the models still served in minimal mode

    @property
    def share(self) -> float:
        return self.available / self.upstreams if self.upstreams else 1.0

    def describe(self) -> str:
        """One sentence for logs and refusals."""
        return (f"skyroute is in minimal mode: {self.available} of {self.upstreams} upstreams "
                f"are available ({self.share:.0%}, below "
                f"degradation.minimal.when_available_below {self.below:.0%})")


@dataclass(frozen=True, slots=True, kw_only=True)
class Serve:
    """Serve the request over ``route``: the one asked for, or its fallback."""

    route: Route
    level: Level  # the level of the route asked for
    fallback_for: str | None = None  # the model asked for, when ``route`` is its fallback
    max_tokens: int | None = None  # cap max_tokens / max_completion_tokens to this


@dataclass(frozen=True, slots=True, kw_only=True)
class Refuse:
    """Do not serve the request now; answer 503 with ``message`` and Retry-After."""

    reason: str  # "not_essential" or "n_above_max" (the metric label)
    message: str
    retry_after_s: float
    param: str | None = None  # the request field at fault, for the OpenAI error shape


@dataclass(frozen=True, slots=True, kw_only=True)
class LevelChange:
    """A route's level changed; ``reason`` is short (the ``reason`` field of the log event)."""

    route: str
    old: Level
    new: Level
    reason: str
    at: float


@final
class LevelView:
    """Levels and serving decisions at one instant, from every upstream's state."""

    __slots__ = ("_policy", "_routes", "_served", "_states", "minimal")

    def __init__(self, policy: DegradationPolicy, routes: Mapping[str, Route],
                 states: Mapping[str, UpstreamState], *, available: int,
                 essential: tuple[str, ...]) -> None:
        """Args:
            states: every upstream's state (kept current by ``routing._fleet``).
            available: how many of ``states`` are available (counted there, as they change).
            essential: the models of the routes marked ``essential`` (once per config).
        """
        self._policy = policy
        self._routes = routes
        self._states = states
        #: Outside minimal mode a route's ``Serve`` depends on nothing but the route and the
        #: states this view was made from: made once per view, then reused (model -> (the
        #: route asked for, its Serve)).
        self._served: dict[str, tuple[Route, Serve]] = {}
        self.minimal = MinimalTrigger(
            active=bool(essential and states) and available / len(states) < policy.minimal_below,
            available=available, upstreams=len(states), below=policy.minimal_below,
            essential=essential)

    def level(self, route: Route) -> Level:
        """The route's level (see the table in the module docstring)."""
        own = self._own_level(route)
        return Level.MINIMAL if self.minimal.active and own is not Level.UNAVAILABLE else own

    def fallback(self, route: Route) -> Route | None:
        """The first route along ``route``'s fallback chain with an available target."""
        if not self._policy.fallback_enabled:
            return None
        seen = {route.model}
        name = route.fallback_model
        while name is not None and name in self._routes and name not in seen:
            candidate = self._routes[name]
            if self._has_available(candidate):
                return candidate
            seen.add(name)
            name = candidate.fallback_model
        return None

    def serving(self, route: Route, *, n: int | None, retry_after_s: float) -> Serve | Refuse:
        """What to do with a request for ``route`` asking for ``n`` choices.

        Args:
            retry_after_s: when the first unavailable upstream is expected back,
                for the Retry-After of a refusal.
        """
        if not self.minimal.active:
            served = self._served.get(route.model)
            if served is not None and served[0] is route:
                return served[1]
            own = self._own_level(route)
            fallback = self.fallback(route) if own is Level.FALLBACK else None
            serve = Serve(route=route, level=own) if fallback is None else \
                Serve(route=fallback, level=own, fallback_for=route.model)
            self._served[route.model] = (route, serve)
            return serve
        policy = self._policy
        if self.minimal.active and not route.essential:
            return Refuse(reason="not_essential", retry_after_s=retry_after_s, param="model",
                          message=(f"{self.minimal.describe()}, so it serves only essential "
                                   f"models ({', '.join(self.minimal.essential)}). "
                                   f"Model '{route.model}' is not essential: retry after "
                                   f"{retry_after_s:.0f}s, or mark its route 'essential: true' "
                                   "in the routing file."))
        if self.minimal.active and n is not None and n > policy.minimal_max_n:
            return Refuse(reason="n_above_max", retry_after_s=retry_after_s, param="n",
                          message=(f"{self.minimal.describe()}, so a request may ask for at "
                                   f"most {policy.minimal_max_n} choice(s) "
                                   f"(degradation.minimal.max_n); this one asked for n={n}. "
                                   f"Send n={policy.minimal_max_n}, or retry after "
                                   f"{retry_after_s:.0f}s."))
        own = self._own_level(route)
        fallback = self.fallback(route) if own is Level.FALLBACK else None
        serving = fallback if fallback is not None else route
        level = Level.MINIMAL if self.minimal.active and own is not Level.UNAVAILABLE else own
        return Serve(route=serving, level=level, max_tokens=(
            policy.minimal_max_tokens if self.minimal.active else None),
            fallback_for=route.model if serving is not route else None)

    def serving_route(self, route: Route) -> Route:
        """The route whose targets serve ``route``'s requests now: itself, or its fallback."""
        fallback = self.fallback(route) if self._own_level(route) is Level.FALLBACK else None
        return fallback if fallback is not None else route

    def reason(self, route: Route, level: Level) -> str:
        """Why ``route`` is at ``level``, as one sentence."""
        states = [(name, self._states.get(name, UpstreamState.DOWN)) for name in route.targets]
        listed = ", ".join(f"{name} {state}" for name, state in states)
        if level is Level.NORMAL:
            return f"first target {states[0][0]} is healthy" if states else "no targets"
        if level is Level.REDUCED:
            serving = ", ".join(name for name, state in states if state in AVAILABLE)
            return f"first target {states[0][0]} is {states[0][1]}; serving from {serving}"
        if level is Level.FALLBACK:
            fallback = self.fallback(route)
            return (f"no target is available ({listed}); serving fallback model "
                    f"{fallback.model if fallback else '-'}")
        if level is Level.MINIMAL:
            return (f"{self.minimal.describe()}; "
                    + ("served capped (essential)" if route.essential
                       else "refused (not essential)"))
        why = "fallback is disabled" if route.fallback_model and \
            not self._policy.fallback_enabled else "no fallback model can serve"
        return f"no target is available ({listed}) and {why}"

    def _own_level(self, route: Route) -> Level:
        """The route's level from its own targets and fallbacks, before ``minimal``."""
        states = [self._states.get(name, UpstreamState.DOWN) for name in route.targets]
        if states and states[0] is UpstreamState.HEALTHY:
            return Level.NORMAL
        if any(state in AVAILABLE for state in states):
            return Level.REDUCED
        if self.fallback(route) is not None:
            return Level.FALLBACK
        return Level.UNAVAILABLE

    def _has_available(self, route: Route) -> bool:
        return any(self._states.get(name) in AVAILABLE for name in route.targets)


def capped_payload(payload: Mapping[str, Any] | None, cap: int | None) -> dict[str, Any] | None:
    """A request body with its token limits capped to ``cap`` (``Serve.max_tokens`` in
    minimal mode); None when nothing changes.

    Only generation requests (with ``messages`` or ``prompt``) are touched:
    ``max_tokens`` and ``max_completion_tokens`` above the cap are lowered, and
    ``max_tokens`` is added when neither is set. A value that is not a whole
    number is left for the upstream to refuse.
    """
    if cap is None or payload is None or not ("messages" in payload or "prompt" in payload):
        return None
    keys = [k for k in ("max_tokens", "max_completion_tokens") if payload.get(k) is not None]
    capped = dict(payload)
    for key in keys or ["max_tokens"]:
        value = payload.get(key)
        if value is None or (type(value) is int and value > cap):
            capped[key] = cap
    return capped if capped != payload else None


@final
class LevelWatch:
    """Remembers each route's last reported level and reports changes once."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last: dict[str, Level] = {}

    def __repr__(self) -> str:
        return f"<LevelWatch {self._last}>"

    def changes(self, view: LevelView, routes: Iterable[Route], *,
                now: float) -> list[LevelChange]:
        """Every route whose level differs from the last call's (a new route starts normal)."""
        result, last = [], {}
        for route in routes:
            new = view.level(route)
            old = self._last.get(route.model, Level.NORMAL)
            if new != old:
                result.append(LevelChange(route=route.model, old=old, new=new,
                                          reason=view.reason(route, new), at=now))
            last[route.model] = new
        self._last = last  # routes removed by a reload are forgotten
        return result
