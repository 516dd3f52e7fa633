"""The fleet view kept current by events equals reading every upstream afresh.

``Router`` keeps every upstream's state and the available count up to date as
outcomes, reports, estimates and cool-downs happen (``routing._fleet``), so a request
does not walk the fleet. Here random sequences of everything that changes a state (every
kind of event in ``tests.router_events``), with time moving on by random steps, are
checked against a full re-read after each.
"""

from __future__ import annotations

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

from .router_events import Event, apply_event, router_events

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
@given(st.lists(router_events(NAMES, ("chat", "other", "small")), max_size=40))
def test_fleet_view_equals_a_full_read_after_every_change(events: list[Event]) -> None:
    router = Router(parse_config(CONFIG_TEXT, env={"X": "1"}))
    now = 100.0
    _check(router, now)
    for event in events:
        now = apply_event(router, event, now, config_text=CONFIG_TEXT)
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
