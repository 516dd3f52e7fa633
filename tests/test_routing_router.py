"""AttemptPlan decisions, driven by scripted outcomes and a fake clock."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from skyroute.routing import (
    AttemptOutcome,
    GiveUp,
    Respond,
    Result,
    Retry,
    Router,
    RoutingStateError,
    UpstreamState,
    classify_status,
    parse_config,
)

from .fakes import FakeClock

CONFIG = parse_config("""\
upstreams:
  - {name: a, url: "http://a/v1", models: {chat: m-a}}
  - {name: b, url: "http://b/v1", models: {chat: m-b}}
  - {name: pool, endpoints: ["http://p1/v1", "http://p2/v1"], models: {chat: m-p}}
routes:
  - {model: chat, targets: [a, b, pool], max_attempts: 3, timeout: 10s}
""", env={})


def _run(script: list[Result], *, start: float = 100.0, step: float = 0.0):
    """Feed outcomes one per attempt; return the targets tried and the last decision."""
    router = Router(CONFIG)
    now = start
    plan = router.plan(CONFIG.route_for("chat"), now=now)
    tried, decision = [], None
    for result in script:
        target = plan.next_attempt(now=now)
        if isinstance(target, GiveUp):
            return tried, target
        tried.append((target.name, target.model))
        now += step
        decision = plan.record(AttemptOutcome(target=target, result=result), now=now)
        if not isinstance(decision, Retry):
            break
    return tried, decision


CASES = [
    # (outcomes, upstreams tried, decision type)
    ([Result.SUCCESS], ["a"], Respond),
    ([Result.SERVER_ERROR, Result.SUCCESS], ["a", "b"], Respond),
    ([Result.CONNECT_ERROR, Result.BUSY, Result.SUCCESS], ["a", "b", "pool"], Respond),
    ([Result.CLIENT_ERROR], ["a"], Respond),
    ([Result.BAD_KEY, Result.SUCCESS], ["a", "b"], Respond),
    ([Result.RATE_LIMITED, Result.SERVER_ERROR, Result.BUSY], ["a", "b", "pool"], GiveUp),
]


@pytest.mark.parametrize(("script", "upstreams", "kind"), CASES)
def test_AttemptPlan_fails_over_in_preference_order(script, upstreams, kind):
    """Transient failures move to the next target; client errors and successes stop."""
    tried, decision = _run(script)
    assert [name for name, _ in tried] == upstreams
    assert isinstance(decision, kind)


def test_AttemptPlan_uses_each_upstreams_model_name():
    """Each attempt carries the upstream's own name for the alias."""
    tried, _ = _run([Result.SERVER_ERROR, Result.SERVER_ERROR, Result.SUCCESS])
    assert [model for _, model in tried] == ["m-a", "m-b", "m-p"]


def test_AttemptPlan_give_up_is_503_when_every_upstream_was_busy_or_overloaded():
    """All-busy or overloaded upstreams give a 503 with Retry-After and name each attempt."""
    _, decision = _run([Result.RATE_LIMITED, Result.SERVER_ERROR, Result.BUSY])
    assert isinstance(decision, GiveUp)
    assert decision.status == 503 and decision.retry_after_s is not None
    assert "a: rate_limited" in decision.message and "pool: busy" in decision.message


def test_AttemptPlan_give_up_is_503_with_retry_after_for_connect_errors():
    """Connection failures everywhere give a 503 with Retry-After, never a bare 502."""
    _, decision = _run([Result.CONNECT_ERROR] * 3)
    assert isinstance(decision, GiveUp) and decision.status == 503
    assert decision.retry_after_s == 1 and "Retry after 1s" in decision.message


def test_AttemptPlan_busy_everywhere_is_503_and_the_route_deadline_504():
    """Busy or timed-out upstreams give 503; only the route's own deadline gives 504."""
    _, busy = _run([Result.BUSY, Result.TIMEOUT, Result.BUSY])
    assert isinstance(busy, GiveUp) and busy.status == 503
    _, late = _run([Result.BUSY, Result.BUSY], step=11.0)
    assert isinstance(late, GiveUp) and late.status == 504 and late.retry_after_s is not None


def test_AttemptPlan_stops_at_the_request_deadline():
    """After the route's timeout no new attempt starts and the answer is a 504."""
    _, decision = _run([Result.TIMEOUT, Result.TIMEOUT], step=11.0)
    assert isinstance(decision, GiveUp) and decision.status == 504
    assert "deadline" in decision.message


def test_AttemptPlan_record_without_attempt_is_an_error():
    """Recording an outcome with no attempt outstanding raises and changes nothing."""
    router = Router(CONFIG)
    plan = router.plan(CONFIG.route_for("chat"), now=0.0)
    target = plan.next_attempt(now=0.0)
    plan.record(AttemptOutcome(target=target, result=Result.SUCCESS), now=0.0)
    with pytest.raises(RoutingStateError):
        plan.record(AttemptOutcome(target=target, result=Result.SUCCESS), now=0.0)


def test_Router_rotates_pool_endpoints():
    """Successive requests to a pool use its endpoints in turn."""
    router = Router(CONFIG)
    route = CONFIG.route_for("chat")
    endpoints = []
    for _ in range(4):
        plan = router.plan(route, now=0.0)
        for _ in range(3):
            target = plan.next_attempt(now=0.0)
        endpoints.append(target.endpoint)
    assert endpoints == ["http://p1/v1", "http://p2/v1"] * 2


@pytest.mark.parametrize(("status", "result"), [
    (200, Result.SUCCESS), (400, Result.CLIENT_ERROR), (422, Result.CLIENT_ERROR),
    (401, Result.BAD_KEY), (402, Result.BAD_KEY), (429, Result.RATE_LIMITED),
    (500, Result.SERVER_ERROR), (503, Result.SERVER_ERROR), (504, Result.SERVER_ERROR)])
def test_classify_status_follows_who_is_at_fault(status, result):
    """400/422 are the client's, 401/402 the key's, 429 and 5xx transient."""
    assert classify_status(status) is result


HEDGED = """\
upstreams:
  - {name: a, url: "http://a/v1", models: {chat: m-a}}
  - {name: b, url: "http://b/v1", models: {chat: m-b}}
  - {name: c, url: "http://c/v1", models: {chat: m-c}}
routes:
  - {model: chat, targets: [a, b, c], hedge_after: 1s}
"""


@pytest.mark.parametrize(("hedging", "delay_when_reduced"), [("true", 1.0), ("false", None)])
def test_Router_plan_hedges_while_reduced_only_if_degradation_allows(hedging,
                                                                     delay_when_reduced):
    """degradation.reduced.hedging: false stops hedging once the first target is out."""
    config = parse_config(HEDGED + f"degradation:\n  reduced: {{hedging: {hedging}}}\n", env={})
    router = Router(config)
    route = config.route_for("chat")
    plan = router.plan(route, now=0.0)
    assert plan.hedge_delay(plan.next_attempt(now=0.0), now=0.0) == 1.0  # normal: hedges
    router.mark("a", UpstreamState.DOWN, until=30.0, reason="test", now=0.0)
    plan = router.plan(route, now=1.0)
    assert plan.hedge_delay(plan.next_attempt(now=1.0), now=1.0) == delay_when_reduced


def test_an_upstream_that_keeps_losing_hedge_races_stops_looking_fast():
    """A beaten attempt's wait is a latency sample, so lowest-latency stops choosing it first."""
    config = parse_config("""\
upstreams:
  - {name: a, url: "http://a/v1", models: {chat: m-a}}
  - {name: b, url: "http://b/v1", models: {chat: m-b}}
routes:
  - {model: chat, targets: [a, b], hedge_after: 150ms}
""", env={})
    router, route = Router(config), config.route_for("chat")
    plan = router.plan(route, now=0.0)
    first = plan.next_attempt(now=0.0)
    hedge = plan.hedge(now=0.15)
    assert (first.name, hedge and hedge.name) == ("a", "b")  # nothing known: file order
    router.cancel(first, now=0.2, waited_s=0.2)  # b answered first; a had not by 0.2 s
    plan.cancel(first)
    winner = AttemptOutcome(target=hedge, result=Result.SUCCESS, ttfb_s=0.05)
    router.record(winner, now=0.2)
    plan.record(winner, now=0.2)
    router.tick(now=1.0)
    assert router.health("a").latency.p95(now=1.0) == pytest.approx(0.2)
    assert router.plan(route, now=1.0).next_attempt(now=1.0).name == "b"


def test_POOL_FULL_moves_on_and_is_not_held_against_the_upstream():
    """A full connection pool tries the next target and leaves the upstream's health alone."""
    router = Router(CONFIG)
    plan = router.plan(CONFIG.route_for("chat"), now=100.0)
    for _ in range(10):  # far more than the breaker's consecutive-failure threshold
        target = plan.next_attempt(now=100.0)
        assert target.name == "a"
        outcome = AttemptOutcome(target=target, result=Result.POOL_FULL)
        assert router.record(outcome, now=100.0) is None  # no health change
        decision = plan.record(outcome, now=100.0)
        assert isinstance(decision, Retry)
        plan = router.plan(CONFIG.route_for("chat"), now=100.0)
    snapshot = router.snapshot(now=100.0)["a"]
    assert snapshot["state"] == "healthy" and snapshot["breaker"] == "CLOSED"
    assert snapshot["outstanding"] == 0


def test_AttemptPlan_give_up_is_503_when_every_pool_was_full():
    """Every target's pool full: 503 with Retry-After (not 502: no upstream failed)."""
    tried, decision = _run([Result.POOL_FULL] * 3)
    assert [name for name, _ in tried] == ["a", "b", "pool"]
    assert isinstance(decision, GiveUp) and decision.status == 503
    assert decision.retry_after_s is not None


# -- latency that is not known yet, and the estimates shared through Prometheus -------------

LOWEST = """\
upstreams:
  - {name: a, url: "http://a/v1", models: {chat: m-a}}
  - {name: b, url: "http://b/v1", models: {chat: m-b}}
  - {name: c, url: "http://c/v1", models: {chat: m-c}}
routes:
  - {model: chat, targets: [b, a, c]}
latency:
  prometheus: {url: "http://prometheus:9090", interval: 1s}
"""


def test_Router_upstream_with_no_estimate_gets_only_the_probe_share():
    """Under lowest-latency, an upstream with no latency known is not taken for the fastest."""
    clock = FakeClock()
    router = Router(parse_config(LOWEST, env={}), rng=random.Random(7))
    for name, seconds in (("a", 0.30), ("c", 0.05)):
        router.feed_external(name, seconds, source="prometheus", now=clock.now())
    router.tick(now=clock.now())
    route = router.config.route_for("chat")
    firsts = Counter(router.plan(route, now=clock.now()).next_attempt(now=clock.now()).name
                     for _ in range(2000))
    assert firsts["b"] / 2000 == pytest.approx(0.02, abs=0.01)  # latency.probe_share
    assert firsts["c"] > 1900 and firsts["a"] == 0  # known and fastest first


def test_Router_cold_start_spreads_requests_over_unknown_upstreams():
    """With nothing known, requests in flight together go to different upstreams."""
    router = Router(parse_config(LOWEST, env={}))
    route = router.config.route_for("chat")
    firsts = [router.plan(route, now=0.0).next_attempt(now=0.0).name for _ in range(3)]
    assert firsts == ["b", "a", "c"]


def test_Router_exports_its_own_estimate_and_holds_it_after_traffic_moves_away():
    """The passive estimate stays exported after its window empties, for 10 windows."""
    clock = FakeClock()
    router = Router(parse_config(LOWEST, env={}))
    route = router.config.route_for("chat")
    plan = router.plan(route, now=clock.now())
    target = plan.next_attempt(now=clock.now())
    router.record(AttemptOutcome(target=target, result=Result.SUCCESS, ttfb_s=0.4),
                  now=clock.now())
    router.feed_external("a", 0.9, source="prometheus", now=clock.now())
    router.tick(now=clock.now())
    assert router.exported_estimates(now=clock.now())[target.name] == {"passive": 0.4}
    assert router.exported_estimates(now=clock.now())["a"] == {"prometheus": 0.9}
    clock.advance(61.0)  # the 60 s passive window is empty now
    router.tick(now=clock.now())
    assert router.exported_estimates(now=clock.now())[target.name] == {"passive": 0.4}
    assert router.exported_estimates(now=clock.now())["a"] == {}  # the reading is stale
    clock.advance(540.0)
    router.tick(now=clock.now())
    assert router.exported_estimates(now=clock.now())[target.name] == {}


def test_Router_update_applies_a_changed_latency_threshold_to_a_kept_upstream():
    """A reload that lowers a route's latency_threshold judges the next estimate of an
    upstream whose health it kept against the new threshold, not the one it started with."""
    clock = FakeClock()
    router = Router(parse_config(LOWEST, env={}))
    router.update(parse_config(LOWEST.replace("targets: [b, a, c]}",
                                              "targets: [b, a, c], latency_threshold: 100ms}"),
                               env={}))
    router.feed_external("a", 0.15, source="prometheus", now=clock.now())
    router.tick(now=clock.now())
    assert router.health("a").state(now=clock.now()) is UpstreamState.SLOW
    assert router.health("a").slow.threshold_s == 0.1
