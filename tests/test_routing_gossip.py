"""Health gossip rules: which findings an instance publishes and which reports it adopts."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from skyroute.routing import (
    GOSSIPED,
    Adopt,
    Finding,
    Publish,
    Router,
    UpstreamState,
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
    # Publishing one upstream and adopting another in the same round.
    ({"a": Finding(state=DOWN, for_s=1.0), "b": Finding(state=HEALTHY)},
     {"b": Report("down", NOW + 2, reporter="peer-2")},
     [Publish(upstream="a", state=DOWN, until=NOW + 1.0),
      Adopt(upstream="b", state=DOWN, for_s=2.0, reason="reported by instance peer-2")]),
]


@pytest.mark.parametrize(("findings", "reports", "decisions"), CASES)
def test_gossip_decisions_follow_the_rules(findings, reports, decisions):
    """bad_key and down are published unless a report stands, and peers' reports of them
    are adopted for the time they have left unless already known here."""
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
