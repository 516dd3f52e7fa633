"""Random events for a ``Router`` on a fake clock: one vocabulary for the property tests.

The tests that check an invariant of ``Router`` after every change (the short way of
``plan`` orders as the general one; the fleet view equals a full read) drive it with
the same kinds of event. ``router_events`` draws them, as plain tuples hypothesis
shows readably, and ``apply_event`` applies one and returns the new time. A test
picks the kinds it wants and the upstreams and routes they may name.

Kinds (the tuple's first item, then its fields):

* ``wait``, seconds: time moves on (cool-downs end, windows slide).
* ``outcome``, upstream, result, ttfb_s, retry_after_s: an attempt's outcome, as the
  proxy feeds it, if the upstream admits one (a panic admission: any state).
* ``mark``, upstream, state, seconds: a peer's report that it is down or has a bad key.
* ``trip``, upstream, seconds: its breaker opened directly, as a test might.
* ``estimate``, upstream, seconds, tick: a Prometheus reading (0.5 s: slow; 0.05 s:
  back, ramping), with a ``tick`` after it or not.
* ``slow_then_back``, upstream: slow, then recovered at once: its ramp starts now.
* ``in_flight``, upstream: an attempt admitted and still running.
* ``request``, route, result: a whole request through ``serving`` and ``plan``, its first
  attempt ending with ``result``.
* ``tick``: the router's periodic tick.
* ``reload``: the same file again: every state kept, every ``Route`` new.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from hypothesis import strategies as st
from skyroute.routing import (
    AttemptOutcome,
    Refuse,
    Result,
    Router,
    Target,
    UpstreamState,
    parse_config,
)

Event = tuple[Any, ...]

KINDS = ("wait", "outcome", "mark", "trip", "estimate", "slow_then_back", "in_flight",
         "request", "tick", "reload")
#: Steps of the clock: none, a hair, about a bucket, a breaker's cool-down either side
#: of its end (``cooldown: 3s``), past a window.
WAITS = (0.0, 0.001, 0.5, 1.0, 2.9, 3.0, 7.5, 40.0)


def router_events(upstreams: Sequence[str], routes: Sequence[str], *,
                  kinds: Collection[str] = KINDS,
                  request_results: Sequence[Result] = (Result.SUCCESS, Result.SERVER_ERROR),
                  ) -> st.SearchStrategy[Event]:
    """Events of ``kinds`` naming ``upstreams`` and ``routes``."""
    names = st.sampled_from(upstreams)
    drawn: dict[str, st.SearchStrategy[Event]] = {
        "wait": st.tuples(st.just("wait"), st.sampled_from(WAITS)),
        "outcome": st.tuples(st.just("outcome"), names, st.sampled_from(list(Result)),
                             st.sampled_from([None, 0.01, 0.05, 0.3, 2.0]),
                             st.sampled_from([None, 0.0, 2.0, 10.0])),
        "mark": st.tuples(st.just("mark"), names,
                          st.sampled_from([UpstreamState.DOWN, UpstreamState.BAD_KEY]),
                          st.sampled_from([0.0, 1.0, 5.0, 60.0])),
        "trip": st.tuples(st.just("trip"), names, st.sampled_from([0.0, 2.0, 20.0])),
        "estimate": st.tuples(st.just("estimate"), names, st.sampled_from([0.05, 0.5]),
                              st.booleans()),
        "slow_then_back": st.tuples(st.just("slow_then_back"), names),
        "in_flight": st.tuples(st.just("in_flight"), names),
        "request": st.tuples(st.just("request"), st.sampled_from(routes),
                             st.sampled_from(request_results)),
        "tick": st.tuples(st.just("tick")),
        "reload": st.tuples(st.just("reload")),
    }
    unknown = set(kinds) - set(drawn)
    assert not unknown, f"router_events(): no event kind {sorted(unknown)}"
    return st.one_of(*(drawn[kind] for kind in kinds))


def outcome_event(name: str, result: Result, *, ttfb_s: float | None = None,
                  retry_after_s: float | None = None) -> Event:
    """An ``outcome`` event, for a test's own set-up steps."""
    return ("outcome", name, result, ttfb_s, retry_after_s)


def apply_event(router: Router, event: Event, now: float, *, config_text: str = "") -> float:
    """Apply ``event`` to ``router`` at ``now``; returns the time after it.

    ``config_text`` is the file a ``reload`` reads again.
    """
    kind = event[0]
    if kind == "wait":
        return now + event[1]
    if kind == "outcome":
        _, name, result, ttfb, retry_after = event
        upstream = router.config.upstream(name)
        if router.health(name).admit(now=now, panic=True):
            target = Target(upstream=upstream, endpoint=upstream.endpoints[0], model="m")
            router.record(AttemptOutcome(target=target, result=result, ttfb_s=ttfb,
                                         retry_after_s=retry_after), now=now)
    elif kind == "mark":
        _, name, state, for_s = event
        router.mark(name, state, until=now + for_s, reason="peer", now=now)
    elif kind == "trip":
        _, name, for_s = event
        router.health(name).breaker.trip(now=now, until=now + for_s)
    elif kind == "estimate":
        _, name, seconds, tick = event
        router.feed_external(name, seconds, source="prometheus", now=now)
        if tick:
            router.tick(now=now)
    elif kind == "slow_then_back":
        for seconds in (0.5, 0.05):
            router.feed_external(event[1], seconds, source="prometheus", now=now)
            router.tick(now=now)
    elif kind == "in_flight":
        router.health(event[1]).admit(now=now)
    elif kind == "request":
        _request(router, event[1], event[2], now)
    elif kind == "tick":
        router.tick(now=now)
    elif kind == "reload":
        router.update(parse_config(config_text, env={}))
    else:
        raise AssertionError(f"apply_event(): no event kind {kind!r}")
    return now


def _request(router: Router, model: str, result: Result, now: float) -> None:
    """A whole request: it admits, records and may cancel."""
    route = router.route_for(model)
    assert route is not None
    decision = router.serving(route, n=None, now=now)
    if isinstance(decision, Refuse):
        return
    plan = router.plan(decision.route, now=now)
    target = plan.next_attempt(now=now)
    if isinstance(target, Target):
        outcome = AttemptOutcome(target=target, result=result, ttfb_s=0.02)
        router.record(outcome, now=now)
        plan.record(outcome, now=now)
