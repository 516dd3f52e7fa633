"""Router with local GPU pools: endpoints chosen at admission, fed by scrapes and checks."""

from __future__ import annotations

from skyroute.routing import (
    AttemptOutcome,
    EndpointChange,
    Result,
    Router,
    ServerLoad,
    parse_config,
)

from .fakes import FakeClock

P1, P2, P3 = "http://10.0.0.1:8000/v1", "http://10.0.0.2:8000/v1", "http://10.0.0.3:8000/v1"
YAML = f"""\
latency:
  scrape: {{interval: 1s, unhealthy_after: 2}}
upstreams:
  - {{name: cloud, url: "http://cloud/v1", models: {{chat: m-c}}}}
  - {{name: gpu, endpoints: ["{P1}", "{P2}", "{P3}"], models: {{chat: m-g}}}}
routes:
  # priority: the pool first, so every request here exercises its endpoint picker
  - {{model: chat, targets: [gpu, cloud], max_attempts: 3, strategy: priority}}
"""


def _router(text: str = YAML) -> Router:
    return Router(parse_config(text, env={}))


def _load(waiting: int = 0, running: int = 0, kv: float | None = 0.0) -> ServerLoad:
    return ServerLoad(waiting=waiting, running=running, kv_cache_usage=kv)


def _in_flight(router: Router, now: float) -> dict[str, int]:
    return {v.endpoint: v.in_flight for v in router.pool_snapshot(now=now)["gpu"]}


def test_Router_picks_pool_endpoint_by_scraped_load():
    """A deep queue on one server sends the request to another."""
    clock = FakeClock()
    router = _router()
    for endpoint, waiting in ((P1, 8), (P2, 0), (P3, 3)):
        router.feed_pool_load("gpu", endpoint, _load(waiting=waiting), now=clock.now())
    plan = router.plan(router.route_for("chat"), now=clock.now())
    target = plan.next_attempt(now=clock.now())
    assert (target.name, target.endpoint, target.model) == ("gpu", P2, "m-g")


def test_Router_chooses_endpoint_at_admission_not_at_plan_time():
    """Load that arrives after the plan was made still decides the endpoint."""
    clock = FakeClock()
    router = _router()
    plan = router.plan(router.route_for("chat"), now=clock.now())
    router.feed_pool_load("gpu", P1, _load(waiting=5), now=clock.now())
    router.feed_pool_load("gpu", P2, _load(waiting=5), now=clock.now())
    assert plan.next_attempt(now=clock.now()).endpoint == P3


def test_Router_counts_pool_requests_from_admission_to_record_or_cancel():
    """Admission counts a request in flight; recording or cancelling ends it."""
    clock = FakeClock()
    router = _router()
    route = router.route_for("chat")
    first = router.plan(route, now=clock.now()).next_attempt(now=clock.now())
    second = router.plan(route, now=clock.now()).next_attempt(now=clock.now())
    assert first.endpoint != second.endpoint  # the in-flight count spreads them
    assert _in_flight(router, clock.now()) == {first.endpoint: 1, second.endpoint: 1,
                                               P3: 0}
    router.record(AttemptOutcome(target=first, result=Result.SUCCESS), now=clock.now())
    router.cancel(second, now=clock.now())
    assert _in_flight(router, clock.now()) == {P1: 0, P2: 0, P3: 0}
    assert [v.picks for v in router.pool_snapshot(now=clock.now())["gpu"]] == [1, 1, 0]


def test_Router_without_metrics_spreads_by_in_flight():
    """With no scrape at all, each new request goes to the server with the fewest."""
    router = _router()
    route = router.route_for("chat")
    targets = [router.plan(route, now=0.0).next_attempt(now=0.0) for _ in range(6)]
    assert sorted(t.endpoint for t in targets) == sorted([P1, P2, P3] * 2)


def test_Router_health_checks_take_endpoint_out_and_back():
    """unhealthy_after failed checks take a server out (one change), one passing check back."""
    clock = FakeClock()
    router = _router()
    route = router.route_for("chat")
    assert router.feed_pool_health("gpu", P1, False, now=clock.now()) is None
    change = router.feed_pool_health("gpu", P1, False, now=clock.now())
    assert change == EndpointChange(upstream="gpu", endpoint=P1, healthy=False, failed_checks=2)
    assert router.feed_pool_health("gpu", P1, False, now=clock.now()) is None
    picked = {router.plan(route, now=clock.now()).next_attempt(now=clock.now()).endpoint
              for _ in range(6)}
    assert picked == {P2, P3}
    change = router.feed_pool_health("gpu", P1, True, now=clock.now())
    assert change == EndpointChange(upstream="gpu", endpoint=P1, healthy=True, failed_checks=0)
    assert router.snapshot(now=clock.now())["gpu"]["endpoints"][P1]["healthy"] is True


def test_Router_stale_pool_load_is_ignored():
    """A scrape older than three intervals plus the timeout no longer counts."""
    clock = FakeClock()
    router = _router()
    route = router.route_for("chat")
    router.feed_pool_load("gpu", P1, _load(waiting=9), now=clock.now())
    router.feed_pool_load("gpu", P2, _load(waiting=9), now=clock.now())
    assert router.plan(route, now=clock.now()).next_attempt(now=clock.now()).endpoint == P3
    clock.advance(3.4)
    assert router.plan(route, now=clock.now()).next_attempt(now=clock.now()).endpoint == P3
    clock.advance(0.2)
    assert router.plan(route, now=clock.now()).next_attempt(now=clock.now()).endpoint == P1


def test_Router_update_keeps_unchanged_pool_and_carries_counts_over_a_rebuild():
    """An unchanged pool keeps its picker; a changed one starts afresh but keeps counts."""
    clock = FakeClock()
    router = _router()
    route = router.route_for("chat")
    for _ in range(2):
        router.feed_pool_health("gpu", P3, False, now=clock.now())
    router.update(parse_config(YAML, env={}))
    assert not router.snapshot(now=clock.now())["gpu"]["endpoints"][P3]["healthy"]

    target = router.plan(route, now=clock.now()).next_attempt(now=clock.now())
    assert target.endpoint == P1
    router.update(parse_config(YAML.replace(f', "{P3}"', ""), env={}))
    assert _in_flight(router, clock.now()) == {P1: 1, P2: 0}
    router.record(AttemptOutcome(target=target, result=Result.SUCCESS), now=clock.now())
    assert _in_flight(router, clock.now()) == {P1: 0, P2: 0}


def test_Router_scrape_settings_change_keeps_upstream_health():
    """Editing latency.scrape rebuilds pickers but forgets no breaker or latency history."""
    router = _router()
    before = router.health("cloud")
    router.update(parse_config(YAML.replace("interval: 1s", "interval: 2s"), env={}))
    assert router.health("cloud") is before
    assert router.config.latency.scrape.stale_after_s == 6.5


def test_Router_scraped_pools_are_pools_with_scrape_on():
    """Only pools are scraped, and scrape: false switches one off."""
    quiet = f"""\
  - {{name: quiet, endpoints: ["{P1}", "{P2}"], scrape: false}}
routes:"""
    router = _router(YAML.replace("routes:", quiet))
    assert [u.name for u in router.scraped_pools] == ["gpu"]
    snapshot = router.snapshot(now=0.0)
    assert set(snapshot["quiet"]["endpoints"]) == {P1, P2}
    assert "endpoints" not in snapshot["cloud"]


def test_Router_ignores_pool_readings_for_unknown_endpoints():
    """A scrape that lands after a reload removed its endpoint changes nothing."""
    router = _router()
    before = router.pool_snapshot(now=0.0)
    router.feed_pool_load("gpu", "http://gone:1/v1", _load(waiting=3), now=0.0)
    router.feed_pool_load("nope", P1, _load(waiting=3), now=0.0)
    assert router.feed_pool_health("gpu", "http://gone:1/v1", False, now=0.0) is None
    assert router.feed_pool_health("cloud", P1, False, now=0.0) is None
    assert router.pool_snapshot(now=0.0) == before


def test_Router_pool_retry_goes_to_next_target_with_counts_ended():
    """A failed pool attempt ends its count and the plan moves on to the next upstream."""
    router = _router()
    plan = router.plan(router.route_for("chat"), now=0.0)
    first = plan.next_attempt(now=0.0)
    outcome = AttemptOutcome(target=first, result=Result.CONNECT_ERROR)
    router.record(outcome, now=0.0)
    plan.record(outcome, now=0.0)
    assert plan.next_attempt(now=0.0).name == "cloud"
    assert sum(_in_flight(router, 0.0).values()) == 0
