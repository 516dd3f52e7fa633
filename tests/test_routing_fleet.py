"""The fleet view kept current by events equals reading every upstream afresh.

``Router`` keeps every upstream's state and the available count up to date as
outcomes, reports, estimates and cool-downs happen (``routing._fleet``), so a request
does not walk the fleet. Here random sequences of everything that changes a state,
with time moving on by random steps, are checked against a full re-read after each.
"""

from __future__ import annotations

from typing import Any

import pytest
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
from skyroute.routing._degradation import LevelView
from skyroute.routing._health import AVAILABLE

NAMES = ("a", "b", "c", "d", "e")
CONFIG_TEXT = """\
upstreams:
  - {name: a, url: "http://a/v1", models: {chat: m-a}}
  - {name: b, url: "http://b/v1", models: {chat: m-b}}
  - {name: c, url: "http://c/v1", models: {small: m-c}}
  - {name: d, url: "http://d/v1", models: {other: m-d}}
  - {name: e, url: "http://e/v1", models: {other: m-e}}
routes:
  - {model: chat, targets: [a, b], fallback_model: small, essential: true}
  - {model: other, targets: [d, e]}
breaker: {consecutive_failures: 2, cooldown: 3s}
degradation:
  minimal: {when_available_below: 60%}
"""

_step = st.one_of(
    st.tuples(st.just("wait"), st.sampled_from([0.0, 0.5, 1.0, 2.9, 3.0, 7.5, 40.0])),
    st.tuples(st.just("outcome"), st.sampled_from(NAMES), st.sampled_from(list(Result)),
              st.sampled_from([None, 0.0, 2.0, 10.0])),
    st.tuples(st.just("mark"), st.sampled_from(NAMES),
              st.sampled_from([UpstreamState.DOWN, UpstreamState.BAD_KEY]),
              st.sampled_from([0.0, 1.0, 5.0, 60.0])),
    st.tuples(st.just("trip"), st.sampled_from(NAMES), st.sampled_from([0.0, 2.0, 20.0])),
    st.tuples(st.just("estimate"), st.sampled_from(NAMES), st.sampled_from([0.05, 0.5])),
    st.tuples(st.just("request"), st.sampled_from(["chat", "other", "small"])),
    st.tuples(st.just("tick")),
)


def _apply(router: Router, step: tuple[Any, ...], now: float) -> float:
    kind = step[0]
    if kind == "wait":
        return now + step[1]
    if kind == "outcome":  # an admitted attempt's outcome, as the proxy feeds it
        _, name, result, retry_after = step
        upstream = router.config.upstream(name)
        health = router.health(name)
        if health.admit(now=now, panic=True):
            target = Target(upstream=upstream, endpoint=upstream.endpoints[0], model="m")
            router.record(AttemptOutcome(target=target, result=result, ttfb_s=0.1,
                                         retry_after_s=retry_after), now=now)
    elif kind == "mark":
        _, name, state, for_s = step
        router.mark(name, state, until=now + for_s, reason="peer", now=now)
    elif kind == "trip":  # straight on the breaker, as a test or a future caller might
        _, name, for_s = step
        router.health(name).breaker.trip(now=now, until=now + for_s)
    elif kind == "estimate":
        _, name, seconds = step
        router.feed_external(name, seconds, source="prometheus", now=now)
    elif kind == "request":  # a whole request: it admits, records and may cancel
        route = router.route_for(step[1])
        assert route is not None
        decision = router.serving(route, n=None, now=now)
        if not isinstance(decision, Refuse):
            plan = router.plan(decision.route, now=now)
            target = plan.next_attempt(now=now)
            if isinstance(target, Target):
                outcome = AttemptOutcome(target=target, result=Result.SERVER_ERROR)
                router.record(outcome, now=now)
                plan.record(outcome, now=now)
    elif kind == "tick":
        router.tick(now=now)
    return now


def _check(router: Router, now: float) -> None:
    states = {name: router.health(name).state(now=now) for name in NAMES}
    available = sum(state in AVAILABLE for state in states.values())
    config = router.config
    fresh = LevelView(config.degradation, {r.model: r for r in config.routes}, states,
                      available=available, essential=("chat",))
    minimal = router.minimal(now=now)
    assert (minimal.available, minimal.upstreams) == (available, len(NAMES))
    assert minimal.active is fresh.minimal.active
    assert router.route_levels(now=now) == {r.model: fresh.level(r) for r in config.routes}
    other = router.route_for("other")
    assert other is not None
    decision = router.serving(other, n=None, now=now)
    if isinstance(decision, Refuse):  # Retry-After: the first unavailable one back
        back = min(router.health(n).available_at(now=now) for n, s in states.items()
                   if s not in AVAILABLE)
        assert decision.retry_after_s == pytest.approx(max(1, min(30, -(-(back - now) // 1))))


@settings(max_examples=300, deadline=None)
@given(st.lists(_step, max_size=40))
def test_fleet_view_equals_a_full_read_after_every_change(steps: list[tuple[Any, ...]]) -> None:
    router = Router(parse_config(CONFIG_TEXT, env={"X": "1"}))
    now = 100.0
    _check(router, now)
    for step in steps:
        now = _apply(router, step, now)
        _check(router, now)


def test_a_clock_set_back_reads_every_upstream_again() -> None:
    router = Router(parse_config(CONFIG_TEXT, env={}))
    router.mark("a", UpstreamState.DOWN, until=110.0, reason="peer", now=100.0)
    assert router.minimal(now=120.0).available == 5  # a is back by then
    _check(router, 105.0)  # earlier again (a test's clock): a is down at that time
    assert router.minimal(now=105.0).available == 4


def test_a_reload_reads_the_new_fleet() -> None:
    router = Router(parse_config(CONFIG_TEXT, env={}))
    router.mark("d", UpstreamState.DOWN, until=200.0, reason="peer", now=100.0)
    assert router.minimal(now=101.0).available == 4
    smaller = CONFIG_TEXT.replace('  - {name: e, url: "http://e/v1", models: {other: m-e}}\n',
                                  "").replace("targets: [d, e]", "targets: [d]")
    router.update(parse_config(smaller, env={}))
    minimal = router.minimal(now=102.0)
    assert (minimal.available, minimal.upstreams) == (3, 4)  # d is still down: kept
    router.record(AttemptOutcome(target=Target(
        upstream=router.config.upstream("d"), endpoint="http://d/v1", model="m-d"),
        result=Result.SUCCESS, ttfb_s=0.1), now=103.0)
    assert router.minimal(now=103.0).available == 4
