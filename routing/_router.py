"""Choosing upstreams for a request, and deciding what to do after each attempt.

Rules / theory of operation:

* ``Router`` is built from one ``Config`` and answers, for a model alias, which
  route serves it and in what order its targets are tried. It keeps per-upstream
  state that outlives a single request (the next endpoint of a pool).
* Each client request gets an ``AttemptPlan``: the shell (``proxy/``) asks
  ``next_attempt()`` for a ``Target``, performs the I/O, and feeds the
  ``AttemptOutcome`` back through ``record()``, which returns a decision value:
  ``Respond`` (hand this answer to the client), ``Retry`` (try ``next_attempt``)
  or ``GiveUp`` (answer the client with an error built from what was tried).
* Who is at fault decides retries, as in DeepSeek's documented errors: 400/422
  are the client's and go back untouched; 401/402 are the upstream key's or
  balance's, so another upstream is tried; 429, 5xx, connect errors, timeouts and
  the keep-alive busy mode are transient and another upstream is tried.
* Nothing here does I/O or reads a clock: ``now`` is always an argument.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import final

from ._errors import RoutingStateError
from .config import Config, Route, Upstream


class Result(enum.Enum):
    """How one attempt at one upstream ended."""

    SUCCESS = "success"            # an answer the client gets (2xx, or another status we pass on)
    CLIENT_ERROR = "client_error"  # 400/404/422...: the request itself is wrong; pass it on
    BAD_KEY = "bad_key"            # 401/402/403: that upstream's key or balance is bad
    RATE_LIMITED = "rate_limited"  # 429
    SERVER_ERROR = "server_error"  # 500/502/503/504
    CONNECT_ERROR = "connect_error"
    TIMEOUT = "timeout"            # no bytes for too long once the answer had started
    BUSY = "busy"                  # no first token before the deadline (keep-alives only)
    STREAM_CUT = "stream_cut"      # the answer broke off part-way


#: Results after which the next target is tried.
RETRYABLE = frozenset({Result.BAD_KEY, Result.RATE_LIMITED, Result.SERVER_ERROR,
                       Result.CONNECT_ERROR, Result.TIMEOUT, Result.BUSY, Result.STREAM_CUT})


def classify_status(status: int) -> Result:
    """Map an upstream HTTP status to the ``Result`` it stands for."""
    if status < 400:
        return Result.SUCCESS
    if status in (401, 402, 403):
        return Result.BAD_KEY
    if status == 429:
        return Result.RATE_LIMITED
    if status >= 500:
        return Result.SERVER_ERROR
    return Result.CLIENT_ERROR


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """One concrete place to send one attempt."""

    upstream: Upstream
    endpoint: str  # base URL, e.g. http://10.0.0.5:8000/v1
    model: str  # the upstream's own model name for the requested alias

    @property
    def name(self) -> str:
        return self.upstream.name


@dataclass(frozen=True, slots=True, kw_only=True)
class AttemptOutcome:
    target: Target
    result: Result
    detail: str = ""  # e.g. "HTTP 503", "connection refused"
    status: int | None = None
    retry_after_s: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Respond:
    """Give the client the answer of the last attempt."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Retry:
    """Try ``next_attempt()`` again."""

    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class GiveUp:
    """No attempt left: answer the client with ``status`` and this message."""

    status: int
    message: str
    retry_after_s: float | None = None


Decision = Respond | Retry | GiveUp


@final
class AttemptPlan:
    """The attempts for one client request over one route."""

    __slots__ = ("_candidates", "_deadline", "_index", "attempts", "outcomes", "route")

    def __init__(self, route: Route, candidates: list[Target], *, now: float) -> None:
        self.route = route
        self._candidates = candidates
        self._deadline = now + route.timeout_s
        self._index = 0
        self.attempts = 0
        self.outcomes: list[AttemptOutcome] = []

    def __repr__(self) -> str:
        tried = ", ".join(f"{o.target.name}:{o.result.value}" for o in self.outcomes)
        return f"<AttemptPlan route={self.route.model} attempts={self.attempts} [{tried}]>"

    @property
    def deadline(self) -> float:
        return self._deadline

    def next_attempt(self, *, now: float) -> Target | GiveUp:
        """The target for the next attempt, or ``GiveUp`` when none is left."""
        if self.attempts >= self.route.max_attempts or self._index >= len(self._candidates):
            return self._give_up()
        if now >= self._deadline:
            return self._give_up(timed_out=True)
        target = self._candidates[self._index]
        self._index += 1
        self.attempts += 1
        return target

    def record(self, outcome: AttemptOutcome, *, now: float) -> Decision:
        """Take the outcome of the attempt just made and say what to do next.

        Raises:
            RoutingStateError: if no attempt is outstanding.
        """
        if len(self.outcomes) >= self.attempts:
            raise RoutingStateError("record() called with no attempt outstanding") from None
        self.outcomes.append(outcome)
        if outcome.result not in RETRYABLE:
            return Respond()
        if self.attempts >= self.route.max_attempts or self._index >= len(self._candidates):
            return self._give_up()
        if now >= self._deadline:
            return self._give_up(timed_out=True)
        return Retry(reason=f"{outcome.target.name}: {outcome.detail or outcome.result.value}")

    def _give_up(self, *, timed_out: bool = False) -> GiveUp:
        tried = "; ".join(f"{o.target.name}: {o.detail or o.result.value}" for o in self.outcomes)
        model = self.route.model
        if not self.outcomes:
            return GiveUp(status=503, message=f"no upstream is available for model '{model}'",
                          retry_after_s=1.0)
        results = {o.result for o in self.outcomes}
        status = 504 if timed_out or results <= {Result.TIMEOUT, Result.BUSY} else 502
        if results <= {Result.RATE_LIMITED, Result.SERVER_ERROR, Result.BUSY}:
            status = 503
        hints = [o.retry_after_s for o in self.outcomes if o.retry_after_s is not None]
        retry_after = min(hints) if hints else (1.0 if status == 503 else None)
        why = "the request deadline passed" if timed_out else "every upstream attempt failed"
        return GiveUp(
            status=status,
            message=(f"model '{model}': {why} ({self.attempts} attempt(s): {tried}). "
                     "Retry later; skyroute's /health shows each upstream's state."),
            retry_after_s=retry_after,
        )


@dataclass(slots=True)
class _UpstreamState:
    next_endpoint: int = 0
    outcomes: dict[Result, int] = field(default_factory=dict)


@final
class Router:
    """Routing decisions for one configuration."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._routes = {route.model: route for route in config.routes}
        self._upstreams = {u.name: u for u in config.upstreams}
        self._state = {u.name: _UpstreamState() for u in config.upstreams}

    def __repr__(self) -> str:
        return f"<Router routes={sorted(self._routes)} upstreams={sorted(self._upstreams)}>"

    @property
    def models(self) -> list[str]:
        """Every model alias a client may ask for."""
        return list(self._routes)

    def route_for(self, model: str) -> Route | None:
        return self._routes.get(model)

    def default_route(self) -> Route | None:
        """The route for requests that name no model (the first one in the file)."""
        return self.config.routes[0] if self.config.routes else None

    def plan(self, route: Route, *, now: float) -> AttemptPlan:
        """An ``AttemptPlan`` over the route's targets in preference order."""
        candidates = [self._target(self._upstreams[name], route.model) for name in route.targets]
        return AttemptPlan(route, candidates, now=now)

    def record(self, outcome: AttemptOutcome, *, now: float) -> None:
        """Remember how an attempt went (feeds per-upstream health)."""
        state = self._state[outcome.target.name]
        state.outcomes[outcome.result] = state.outcomes.get(outcome.result, 0) + 1

    def _target(self, upstream: Upstream, alias: str) -> Target:
        state = self._state[upstream.name]
        endpoint = upstream.endpoints[state.next_endpoint % len(upstream.endpoints)]
        state.next_endpoint += 1
        return Target(upstream=upstream, endpoint=endpoint, model=upstream.model_for(alias))
