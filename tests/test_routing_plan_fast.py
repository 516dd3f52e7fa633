"""The short way ``Router.plan`` takes for the usual request orders targets as the general one.

``Router._order`` answers the usual request (every target healthy by the fleet's
states, none ramping back, a latency known for each under ``lowest-latency``) without
the general path's lists, probe draw and ramp draws, and hands anything else to
``Router._order_general``. Here random sequences of every kind of event in
``tests.router_events`` (outcomes with latency samples, reports, trips, estimates: slow,
recovered and ramping back, requests left in flight, clock steps, reloads), after first
latencies, are applied to a router with a fake clock, with every strategy
and a probe share; after each step both ways order every route from the same random
state, and must give the same order (so the same first upstream) and leave the random
generator in the same state (the same draws). A whole request then goes through
``plan`` (the short way) and must take the first of that order.
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st
from skyroute.routing import (
    AttemptOutcome,
    Result,
    Router,
    Target,
    UpstreamState,
    parse_config,
)

from .router_events import Event, apply_event, outcome_event, router_events

NAMES = ("a", "b", "c", "d")
CONFIG_TEXT = """\
upstreams:
  - {name: a, url: "http://a/v1", models: {chat: m-a, prio: m-a, least: m-a, weigh: m-a}}
  - {name: b, url: "http://b/v1", models: {chat: m-b, prio: m-b, least: m-b, weigh: m-b}}
  - {name: c, url: "http://c/v1", models: {chat: m-c, prio: m-c, least: m-c, weigh: m-c},
     weight: 3}
  - {name: d, url: "http://d/v1", models: {solo: m-d, weigh: m-d}}
routes:
  - {model: chat, targets: [a, b, c]}
  - {model: prio, targets: [c, a, b], strategy: priority}
  - {model: least, targets: [b, c, a], strategy: least-outstanding}
  - {model: weigh, targets: [a, b, c, d], strategy: weighted}
  - {model: solo, targets: [d]}
breaker: {consecutive_failures: 2, cooldown: 3s}
latency: {probe_share: 0.3, recover_intervals: 1, ramp: RAMP}
"""
ROUTES = ("chat", "prio", "least", "weigh", "solo")

def _check(router: Router, now: float) -> None:
    rng = router._rng
    for model in ROUTES:
        route = router.route_for(model)
        assert route is not None
        before = rng.getstate()
        general = router._order_general(route, now)
        after_general = rng.getstate()
        rng.setstate(before)
        short = router._order(route, now)
        assert short == general, (model, now)
        assert rng.getstate() == after_general, (model, now)  # the same draws
        rng.setstate(before)
        first = router.plan(route, now=now).next_attempt(now=now)
        if isinstance(first, Target) and short[0] == first.name:
            router.cancel(first, now=now)  # the plan took the order's first: let it go
        elif isinstance(first, Target):  # not admitted (out, a probe held): the next one
            router.cancel(first, now=now)
            assert router.health(short[0]).state(now=now) is not UpstreamState.HEALTHY \
                or router.health(short[0]).breaker.state(now=now).name != "CLOSED", model


@settings(max_examples=300, deadline=None)
@given(st.lists(router_events(NAMES, ROUTES), max_size=40), st.sampled_from(["0s", "10s"]),
       st.integers(0, 2**16),
       st.lists(st.sampled_from([None, 0.01, 0.02, 0.05, 0.3]), min_size=4, max_size=4))
def test_the_short_way_orders_as_the_general_one(events: list[Event], ramp: str,
                                                 seed: int, first: list[float | None]) -> None:
    text = CONFIG_TEXT.replace("RAMP", ramp)
    router = Router(parse_config(text, env={}), rng=random.Random(seed))
    now = 100.0
    for name, ttfb in zip(NAMES, first, strict=True):  # latency known for some (or all)
        if ttfb is not None:
            apply_event(router, outcome_event(name, Result.SUCCESS, ttfb_s=ttfb), now)
    _check(router, now)
    for event in events:
        now = apply_event(router, event, now, config_text=text)
        _check(router, now)


def test_the_usual_request_takes_the_fastest_with_no_draw() -> None:
    router = Router(parse_config(CONFIG_TEXT.replace("RAMP", "10s"), env={}),
                    rng=random.Random(1))
    route = router.route_for("chat")
    assert route is not None
    for name, ttfb in (("a", 0.3), ("b", 0.1), ("c", 0.2)):
        health = router.health(name)
        assert health.admit(now=1.0)
        target = Target(upstream=router.config.upstream(name),
                        endpoint=router.config.upstream(name).endpoints[0], model="m")
        router.record(AttemptOutcome(target=target, result=Result.SUCCESS, ttfb_s=ttfb),
                      now=1.0)
    state = router._rng.getstate()
    assert router._order(route, 2.0) == ["b", "c", "a"]
    assert router._rng.getstate() == state  # nothing probed, nothing ramping: no draw
