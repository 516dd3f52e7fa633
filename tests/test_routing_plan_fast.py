"""The short way ``Router.plan`` takes for the usual request orders targets as the general one.

``Router._order`` answers the usual request (every target healthy by the fleet's
states, none ramping back, a latency known for each under ``lowest-latency``) without
the general path's lists, probe draw and ramp draws, and hands anything else to
``Router._order_general``. Here random sequences of outcomes (with latency samples),
first latencies, reports, trips, estimates (slow, recovered and ramping back), requests
left in flight,
clock steps and reloads are applied to a router with a fake clock, with every strategy
and a probe share; after each step both ways order every route from the same random
state, and must give the same order (so the same first upstream) and leave the random
generator in the same state (the same draws). A whole request then goes through
``plan`` (the short way) and must take the first of that order.
"""

from __future__ import annotations

import random
from typing import Any

from hypothesis import given, settings
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

_step = st.one_of(
    st.tuples(st.just("wait"), st.sampled_from([0.0, 0.001, 0.5, 1.0, 3.0, 7.5, 40.0])),
    st.tuples(st.just("outcome"), st.sampled_from(NAMES), st.sampled_from(list(Result)),
              st.sampled_from([None, 0.01, 0.05, 0.3, 2.0])),
    st.tuples(st.just("mark"), st.sampled_from(NAMES),
              st.sampled_from([UpstreamState.DOWN, UpstreamState.BAD_KEY]),
              st.sampled_from([0.0, 1.0, 5.0])),
    st.tuples(st.just("trip"), st.sampled_from(NAMES), st.sampled_from([0.0, 2.0, 20.0])),
    st.tuples(st.just("estimate"), st.sampled_from(NAMES), st.sampled_from([0.05, 0.5])),
    st.tuples(st.just("slow_then_back"), st.sampled_from(NAMES)),
    st.tuples(st.just("in_flight"), st.sampled_from(NAMES)),  # admitted, still running
    st.tuples(st.just("request"), st.sampled_from(ROUTES),
              st.sampled_from([Result.SUCCESS, Result.SERVER_ERROR])),
    st.tuples(st.just("tick")),
    st.tuples(st.just("reload")),
)


def _apply(router: Router, step: tuple[Any, ...], now: float, text: str) -> float:
    kind = step[0]
    if kind == "wait":
        return now + step[1]
    if kind == "outcome":  # an admitted attempt's outcome, its time to first token a sample
        _, name, result, ttfb = step
        upstream = router.config.upstream(name)
        if router.health(name).admit(now=now, panic=True):
            target = Target(upstream=upstream, endpoint=upstream.endpoints[0], model="m")
            router.record(AttemptOutcome(target=target, result=result, ttfb_s=ttfb), now=now)
    elif kind == "mark":
        _, name, state, for_s = step
        router.mark(name, state, until=now + for_s, reason="peer", now=now)
    elif kind == "trip":
        _, name, for_s = step
        router.health(name).breaker.trip(now=now, until=now + for_s)
    elif kind == "estimate":  # a reading (0.5 s: slow; 0.05 s again: back, ramping)
        _, name, seconds = step
        router.feed_external(name, seconds, source="prometheus", now=now)
        router.tick(now=now)
    elif kind == "slow_then_back":  # slow, then recovered: its ramp starts now
        for seconds in (0.5, 0.05):
            router.feed_external(step[1], seconds, source="prometheus", now=now)
            router.tick(now=now)
    elif kind == "in_flight":
        router.health(step[1]).admit(now=now)
    elif kind == "request":
        _, model, result = step
        route = router.route_for(model)
        assert route is not None
        decision = router.serving(route, n=None, now=now)
        if not isinstance(decision, Refuse):
            plan = router.plan(decision.route, now=now)
            target = plan.next_attempt(now=now)
            if isinstance(target, Target):
                outcome = AttemptOutcome(target=target, result=result, ttfb_s=0.02)
                router.record(outcome, now=now)
                plan.record(outcome, now=now)
    elif kind == "tick":
        router.tick(now=now)
    elif kind == "reload":  # the same file again: every state kept, every Route new
        router.update(parse_config(text, env={}))
    return now


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
@given(st.lists(_step, max_size=40), st.sampled_from(["0s", "10s"]), st.integers(0, 2**16),
       st.lists(st.sampled_from([None, 0.01, 0.02, 0.05, 0.3]), min_size=4, max_size=4))
def test_the_short_way_orders_as_the_general_one(steps: list[tuple[Any, ...]], ramp: str,
                                                 seed: int, first: list[float | None]) -> None:
    text = CONFIG_TEXT.replace("RAMP", ramp)
    router = Router(parse_config(text, env={}), rng=random.Random(seed))
    now = 100.0
    for name, ttfb in zip(NAMES, first, strict=True):  # latency known for some (or all)
        if ttfb is not None:
            _apply(router, ("outcome", name, Result.SUCCESS, ttfb), now, text)
    _check(router, now)
    for step in steps:
        now = _apply(router, step, now, text)
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
