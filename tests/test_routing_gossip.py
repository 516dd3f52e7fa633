"""Health gossip rules: which findings an instance publishes and which reports it adopts."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from skyroute.routing import (
    GOSSIPED,
    Adopt,
    AttemptOutcome,
    Finding,
    Publish,
    Result,
    Router,
    Target,
    UpstreamHealth,
    UpstreamState,
    Withdraw,
    gossip_decisions,
    parse_config,
)
from skyroute.routing._gossip import DEFAULT_REPORT_S

from .fakes import FakeClock

HEALTHY, SLOW, OPEN = UpstreamState.HEALTHY, UpstreamState.SLOW, UpstreamState.OPEN
DOWN, BAD_KEY = UpstreamState.DOWN, UpstreamState.BAD_KEY
NOW = 1_000_000.0  # the store's wall clock


@dataclass(frozen=True)
class Report:
    """A report as statesync's ``UpstreamReport`` carries it."""

    state: str
    until: float | None
    reporter: str = "peer-1"


CASES = [
    # (this instance's findings, reports in force, decisions)
    ({"a": Finding(state=DOWN, for_s=12.0)}, {},
     [Publish(upstream="a", state=DOWN, until=NOW + 12.0)]),
    ({"a": Finding(state=BAD_KEY)}, {},
     [Publish(upstream="a", state=BAD_KEY, until=NOW + DEFAULT_REPORT_S)]),
    # open and slow depend on each instance's load and path: never shared.
    ({"a": Finding(state=OPEN, for_s=5.0), "b": Finding(state=SLOW)}, {}, []),
    # The first report stands: no second one while it is in force.
    ({"a": Finding(state=DOWN, for_s=12.0)}, {"a": Report("down", NOW + 3)}, []),
    # A peer's report is adopted for the time it has left...
    ({"a": Finding(state=HEALTHY)}, {"a": Report("bad_key", NOW + 30)},
     [Adopt(upstream="a", state=BAD_KEY, for_s=30.0, reason="reported by instance peer-1")]),
    ({"a": Finding(state=OPEN)}, {"a": Report("down", None)},
     [Adopt(upstream="a", state=DOWN, for_s=DEFAULT_REPORT_S,
            reason="reported by instance peer-1")]),
    # ...unless it is already known here, has run out, names no upstream configured here,
    # or says something that is not gossiped (a foreign writer may store anything).
    ({"a": Finding(state=BAD_KEY)}, {"a": Report("bad_key", NOW + 30)}, []),
    ({"a": Finding(state=HEALTHY)}, {"a": Report("down", NOW - 1)}, []),
    ({"a": Finding(state=HEALTHY)}, {"zz": Report("down", NOW + 30)}, []),
    ({"a": Finding(state=HEALTHY)}, {"a": Report("slow", NOW + 30)}, []),
    ({"a": Finding(state=HEALTHY)}, {"a": Report("on fire", NOW + 30)}, []),
    # A report about an upstream that has answered here since is out of date: withdrawn,
    # not adopted, whatever time it has left...
    ({"a": Finding(state=HEALTHY, answering=True)}, {"a": Report("bad_key", NOW + 600)},
     [Withdraw(upstream="a")]),
    ({"a": Finding(state=HEALTHY, answering=True)}, {"a": Report("down", None)},
     [Withdraw(upstream="a")]),
    # ...but only a report of a gossiped state about a configured upstream is touched.
    ({"a": Finding(state=HEALTHY, answering=True)}, {"a": Report("slow", NOW + 30)}, []),
    ({"a": Finding(state=HEALTHY, answering=True)}, {"zz": Report("down", NOW + 30)}, []),
    ({"a": Finding(state=HEALTHY, answering=True)}, {}, []),
    # Publishing one upstream and adopting another in the same round.
    ({"a": Finding(state=DOWN, for_s=1.0), "b": Finding(state=HEALTHY)},
     {"b": Report("down", NOW + 2, reporter="peer-2")},
     [Publish(upstream="a", state=DOWN, until=NOW + 1.0),
      Adopt(upstream="b", state=DOWN, for_s=2.0, reason="reported by instance peer-2")]),
]


@pytest.mark.parametrize(("findings", "reports", "decisions"), CASES)
def test_gossip_decisions_follow_the_rules(findings, reports, decisions):
    """bad_key and down are published unless a report stands, and peers' reports of them
    are adopted for the time they have left unless already known here or out of date."""
    assert gossip_decisions(findings, reports, now=NOW) == decisions


def test_GOSSIPED_is_bad_key_and_down():
    """Only the states that cost every instance a failed call are shared."""
    assert frozenset({BAD_KEY, DOWN}) == GOSSIPED


def test_an_adopted_report_takes_the_upstream_out_for_its_time_left():
    """Marking the router with an Adopt decision makes the upstream down until then and
    brings it back after (a fake clock)."""
    router = Router(parse_config(
        "upstreams:\n  - {name: a, url: 'http://a/v1', models: {chat: m}}\n", env={}))
    clock = FakeClock()
    (adopt,) = gossip_decisions({"a": Finding(state=HEALTHY)},
                                {"a": Report("down", NOW + 8)}, now=NOW)
    assert isinstance(adopt, Adopt)
    change = router.mark(adopt.upstream, adopt.state, until=clock.now() + adopt.for_s,
                         reason=adopt.reason, now=clock.now())
    assert change is not None and change.new is DOWN
    assert change.reason == "reported by instance peer-1"
    clock.advance(7.9)
    assert router.health("a").state(now=clock.now()) is DOWN
    clock.advance(0.2)
    assert router.health("a").state(now=clock.now()) is HEALTHY


def test_a_report_is_withdrawn_once_the_upstream_answers_here_after_it():
    """A peer's bad_key report is adopted; a panic try that gets an answer afterwards makes
    it out of date (withdrawn, not adopted again every round); once the latest news here is
    a failure again, a report in force counts (a fake clock)."""
    config = parse_config(
        "upstreams:\n  - {name: a, url: 'http://a/v1', models: {chat: m}}\n", env={})
    health = UpstreamHealth("a", breaker=config.breaker, latency=config.latency,
                            retry=config.retry, threshold_s=0.2)
    target = Target(upstream=config.upstream("a"), endpoint="http://a/v1", model="m")
    clock = FakeClock()
    reports = {"a": Report("bad_key", NOW + 600)}

    def decide() -> list[Publish | Adopt | Withdraw]:
        finding = Finding(state=health.state(now=clock.now()), answering=health.is_answering())
        return gossip_decisions({"a": finding}, reports, now=NOW + clock.now())

    (adopt,) = decide()  # no answer here yet: the report is taken
    assert isinstance(adopt, Adopt) and adopt.state is BAD_KEY
    health.mark(adopt.state, until=clock.now() + adopt.for_s, reason=adopt.reason,
                now=clock.now())
    assert decide() == []  # known here now
    clock.advance(1.0)
    assert health.admit(now=clock.now(), panic=True)  # the panic rule tries it anyway
    health.record(AttemptOutcome(target=target, result=Result.SUCCESS, ttfb_s=0.05),
                  now=clock.now())
    assert health.state(now=clock.now()) is HEALTHY
    assert decide() == [Withdraw(upstream="a")]
    clock.advance(1.0)
    health.record(AttemptOutcome(target=target, result=Result.SERVER_ERROR, ttfb_s=0.05),
                  now=clock.now())
    assert not health.is_answering()  # the latest news here is a failure: a report counts
    assert isinstance(decide()[0], Adopt)
