"""AttemptPlan's retry budget, panic rule and give-up answers, with scripted outcomes and a
fake clock."""

from __future__ import annotations

from skyroute.routing import (
    AttemptOutcome,
    GiveUp,
    Respond,
    Result,
    Retry,
    Router,
    Target,
    UpstreamState,
    parse_config,
)

from .fakes import FakeClock

THREE = """\
upstreams:
  - {name: a, url: "http://a/v1", models: {chat: m-a}}
  - {name: b, url: "http://b/v1", models: {chat: m-b}}
  - {name: c, url: "http://c/v1", models: {chat: m-c}}
routes:
  - {model: chat, targets: [a, b, c], strategy: priority}
"""
#: Breakers that never trip on their own, so a test decides who is out.
NO_TRIPS = "breaker: {consecutive_failures: 1000, failure_rate: 100%, min_requests: 1000}\n"


def _serve(router: Router, clock: FakeClock, outcomes: dict[str, Result]):
    """One request, each upstream answering as ``outcomes`` says (success if not named).

    Returns:
        the upstreams tried, in order, and the final decision (Respond or GiveUp).
    """
    route = router.config.route_for("chat")
    plan = router.plan(route, now=clock.now())
    tried = []
    while True:
        target = plan.next_attempt(now=clock.now())
        if isinstance(target, GiveUp):
            return tried, target
        tried.append(target.name)
        outcome = AttemptOutcome(target=target, result=outcomes.get(target.name, Result.SUCCESS),
                                 ttfb_s=0.05)
        router.record(outcome, now=clock.now())
        decision = plan.record(outcome, now=clock.now())
        if not isinstance(decision, Retry):
            return tried, decision
        clock.advance(decision.delay_s)


def test_AttemptPlan_failover_to_untried_healthy_upstreams_spends_no_budget():
    """Cold start, a 503s and b is busy: twelve requests at once all reach c (the issue's row 1)."""
    clock = FakeClock()
    router = Router(parse_config(THREE, env={}))
    route = router.config.route_for("chat")
    now = clock.now()
    plans = [router.plan(route, now=now) for _ in range(12)]
    answers = {"a": Result.SERVER_ERROR, "b": Result.BUSY, "c": Result.SUCCESS}
    tried: list[list[str]] = [[] for _ in plans]
    pending = [(i, plan.next_attempt(now=now)) for i, plan in enumerate(plans)]
    decisions = {}
    while pending:  # every request's attempt is in flight before any outcome arrives
        step = []
        for i, target in pending:
            tried[i].append(target.name)
            outcome = AttemptOutcome(target=target, result=answers[target.name], ttfb_s=0.05)
            router.record(outcome, now=now)
            decision = plans[i].record(outcome, now=now)
            if isinstance(decision, Retry):
                assert decision.delay_s == 0.0 and not decision.paid  # failover: free, at once
                step.append((i, plans[i].next_attempt(now=now)))
            else:
                decisions[i] = decision
        pending = step
    assert all(isinstance(d, Respond) for d in decisions.values()), decisions
    assert tried == [["a", "b", "c"]] * 12
    assert all(plan.paid_retries == 0 for plan in plans)


def test_AttemptPlan_retries_to_failing_upstreams_are_paid_down_to_the_floor():
    """Retries that go back to upstreams already out are paid; the floor allows 10 per 10 s."""
    clock = FakeClock()
    router = Router(parse_config(THREE + NO_TRIPS, env={}))
    for name in ("b", "c"):
        router.mark(name, UpstreamState.DOWN, until=clock.now() + 60.0, reason="test",
                    now=clock.now())
    failing = {"a": Result.SERVER_ERROR, "b": Result.CONNECT_ERROR, "c": Result.CONNECT_ERROR}
    for _ in range(5):  # each: a fails, then two paid retries: the panic tries on b and c
        tried, decision = _serve(router, clock, failing)
        assert sorted(tried) == ["a", "b", "c"] and isinstance(decision, GiveUp)
        assert not decision.budget_exhausted
    tried, decision = _serve(router, clock, failing)
    assert tried == ["a"]
    assert isinstance(decision, GiveUp) and decision.budget_exhausted
    assert decision.status == 503 and decision.retry_after_s is not None
    assert "retry budget is spent" in decision.message


def test_AttemptPlan_spent_budget_still_fails_over_to_a_healthy_upstream():
    """With the budget spent, a request still moves on to an untried healthy upstream."""
    clock = FakeClock()
    router = Router(parse_config(THREE + NO_TRIPS, env={}))
    router.mark("b", UpstreamState.DOWN, until=clock.now() + 60.0, reason="test", now=clock.now())
    router.mark("c", UpstreamState.DOWN, until=clock.now() + 2.0, reason="test", now=clock.now())
    failing = {"a": Result.SERVER_ERROR, "b": Result.CONNECT_ERROR, "c": Result.CONNECT_ERROR}
    while not _serve(router, clock, failing)[1].budget_exhausted:
        pass
    clock.advance(2.0)  # c is back; the spent retries are still in the 10 s window
    tried, decision = _serve(router, clock, {"a": Result.SERVER_ERROR})
    assert tried == ["a", "c"] and isinstance(decision, Respond)


FAILING = {"a": Result.SERVER_ERROR, "b": Result.CONNECT_ERROR, "c": Result.CONNECT_ERROR}


def _spend_the_budget(router: Router, clock: FakeClock) -> None:
    """Requests whose retries go back to failing upstreams until the budget gives out."""
    for name in ("b", "c"):
        router.mark(name, UpstreamState.DOWN, until=clock.now() + 600.0, reason="test",
                    now=clock.now())
    while not _serve(router, clock, FAILING)[1].budget_exhausted:
        pass


def test_Router_update_applies_a_changed_retry_budget_at_once():
    """A reload that widens budget_window gives the route a budget with the new settings:
    retries refused a moment ago are allowed again, without a restart."""
    clock = FakeClock()
    router = Router(parse_config(THREE + NO_TRIPS, env={}))
    _spend_the_budget(router, clock)
    router.update(parse_config(THREE + NO_TRIPS + "retry: {budget_window: 100s}\n", env={}))
    tried, decision = _serve(router, clock, FAILING)
    assert sorted(tried) == ["a", "b", "c"] and not decision.budget_exhausted


def test_Router_update_keeps_a_spent_budget_whose_settings_did_not_change():
    """A reload that changes something else (a route's timeout) keeps the budget's counts:
    a reload is no way around a spent budget."""
    clock = FakeClock()
    router = Router(parse_config(THREE + NO_TRIPS, env={}))
    _spend_the_budget(router, clock)
    router.update(parse_config(THREE.replace("strategy: priority", "strategy: priority, "
                                             "timeout: 30s") + NO_TRIPS, env={}))
    tried, decision = _serve(router, clock, FAILING)
    assert tried == ["a"] and decision.budget_exhausted


def test_Router_update_applies_a_changed_bad_key_cooldown_to_a_kept_upstream():
    """retry.bad_key_cooldown changed on reload holds for the next 401 of an upstream whose
    health (breaker, latency) the reload kept."""
    clock = FakeClock()
    router = Router(parse_config(THREE + NO_TRIPS, env={}))
    router.update(parse_config(THREE + NO_TRIPS + "retry: {bad_key_cooldown: 5s}\n", env={}))
    _serve(router, clock, {"a": Result.BAD_KEY})
    assert router.health("a").bad_key_until == clock.now() + 5.0


def test_AttemptPlan_panic_probe_is_tried_when_every_upstream_is_out_and_closes_it():
    """All breakers open: the one back soonest is tried; its success brings the route back."""
    clock = FakeClock()
    router = Router(parse_config(THREE, env={}))
    for name, until in (("a", 20.0), ("b", 5.0), ("c", 10.0)):
        router.health(name).breaker.trip(now=clock.now(), until=clock.now() + until)
    route = router.config.route_for("chat")
    assert router.route_level(route, now=clock.now()) == "unavailable"
    tried, decision = _serve(router, clock, {})
    assert tried == ["b"] and isinstance(decision, Respond)
    assert router.health("b").state(now=clock.now()) == "healthy"
    assert router.route_level(route, now=clock.now()) != "unavailable"


def test_AttemptPlan_panic_try_goes_to_the_upstream_that_failed_longest_ago():
    """c failed 20 s ago and is told to wait 30 s; a and b failed just now: c is tried."""
    clock = FakeClock()
    router = Router(parse_config(THREE, env={}))

    def fail(name: str, result: Result, retry_after_s: float | None = None) -> None:
        target = Target(upstream=router.config.upstream(name), endpoint=f"http://{name}/v1",
                        model=f"m-{name}")
        router.record(AttemptOutcome(target=target, result=result,
                                     retry_after_s=retry_after_s), now=clock.now())

    fail("c", Result.RATE_LIMITED, retry_after_s=30.0)
    clock.advance(20.0)
    for _ in range(5):
        fail("a", Result.SERVER_ERROR)
        fail("b", Result.SERVER_ERROR)
    assert {router.health(n).state(now=clock.now()) for n in "abc"} == {"open"}
    assert router.health("c").available_at(now=clock.now()) > \
        router.health("a").available_at(now=clock.now())
    tried, decision = _serve(router, clock, {})
    assert tried == ["c"] and isinstance(decision, Respond)


def test_AttemptPlan_panic_probes_go_one_at_a_time_then_fail_fast():
    """While every out upstream has its panic probe in flight, a request gets a 503 at once."""
    clock = FakeClock()
    router = Router(parse_config(THREE, env={}))
    for name, until in (("a", 20.0), ("b", 5.0), ("c", 10.0)):
        router.health(name).breaker.trip(now=clock.now(), until=clock.now() + until)
    route = router.config.route_for("chat")
    firsts = [router.plan(route, now=clock.now()).next_attempt(now=clock.now())
              for _ in range(4)]
    assert [t.name for t in firsts[:3]] == ["b", "c", "a"]
    refused = firsts[3]
    assert isinstance(refused, GiveUp) and refused.status == 503
    assert refused.retry_after_s == 5 and "Retry after 5s" in refused.message
    assert "no upstream is available" in refused.message and "a open" in refused.message


def test_AttemptPlan_give_up_is_429_with_the_soonest_retry_after_when_all_rate_limit():
    """Every attempt rate-limited: 429 with the soonest Retry-After, which the message repeats."""
    clock = FakeClock()
    router = Router(parse_config(THREE, env={}))
    route = router.config.route_for("chat")
    plan = router.plan(route, now=clock.now())
    decision = None
    for seconds in (12.0, 7.5, 20.0):
        target = plan.next_attempt(now=clock.now())
        outcome = AttemptOutcome(target=target, result=Result.RATE_LIMITED, status=429,
                                 retry_after_s=seconds)
        router.record(outcome, now=clock.now())
        decision = plan.record(outcome, now=clock.now())
    assert isinstance(decision, GiveUp) and decision.status == 429
    assert decision.retry_after_s == 8 and "Retry after 8s" in decision.message


def test_AttemptPlan_retry_after_is_capped_at_30_seconds():
    """However long every upstream is out, the Retry-After a client gets is at most 30 s."""
    clock = FakeClock()
    router = Router(parse_config(THREE, env={}))
    for name in ("a", "b", "c"):
        router.health(name).breaker.trip(now=clock.now(), until=clock.now() + 600.0)
    tried, decision = _serve(router, clock, dict.fromkeys("abc", Result.RATE_LIMITED))
    assert tried == ["a", "b", "c"] and isinstance(decision, GiveUp)
    assert decision.status == 429
    assert decision.retry_after_s == 30 and "Retry after 30s" in decision.message


def test_Router_upstream_recovers_within_seconds_after_a_short_outage():
    """25 s of alternating 429s and 500s on a and b, then they answer: healthy within 30 s.

    (Each 429 used to lengthen the trip streak, so one 500 then opened for 300 s.)
    """
    clock = FakeClock(start=0.0)
    router = Router(parse_config(THREE, env={}))
    kinds = [Result.RATE_LIMITED, Result.SERVER_ERROR]
    step = 0
    while clock.now() < 25.0:  # 10 requests a second
        kind = kinds[step % 2]
        _serve(router, clock, {"a": kind, "b": kind})
        step += 1
        clock.advance(0.1)
    outage_end = clock.now()
    while {router.health(n).state(now=clock.now()) for n in "ab"} != {"healthy"}:
        _serve(router, clock, {})
        clock.advance(0.1)
    assert clock.now() - outage_end <= 30.0
    assert router.level(now=clock.now()) == "normal"
