"""Tests for routing._breaker: the per-upstream circuit breaker."""

from __future__ import annotations

from typing import Any

import pytest
from skyroute.routing._breaker import (
    _TRANSITIONS,
    Admission,
    BreakerState,
    BreakerTransition,
    CircuitBreaker,
    Outcome,
)
from skyroute.routing._errors import RoutingStateError

from .fakes import FakeClock

S, F = Outcome.SUCCESS, Outcome.FAILURE
CLOSED, OPEN, HALF = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN

# A script step is (op, arg, expected):
#   ("wait", seconds, None)           advance the clock
#   ("allows", None, bool)            allows() answers this
#   ("record", Outcome, state|None)   record() returns a transition to this state, or None
#   ("trip", until_offset|None, state|None)  trip(until=now+offset) returns this
#   ("state", None, BreakerState)     state() reports this
Step = tuple[str, Any, Any]


def run(breaker: CircuitBreaker, clock: FakeClock, steps: list[Step]) -> list[BreakerTransition]:
    """Play a script against a breaker, checking each answer; return the transitions seen."""
    seen: list[BreakerTransition] = []
    for i, (op, arg, expected) in enumerate(steps):
        now = clock.now()
        if op == "wait":
            clock.advance(arg)
            continue
        if op == "state":
            assert breaker.state(now=now) is expected, (i, breaker)
            continue
        if op == "allows":
            admission = breaker.allows(now=now)
            assert bool(admission) is expected, (i, breaker)
            transition = admission.transition
        elif op == "record":
            transition = breaker.record(arg, now=now)
        else:
            transition = breaker.trip(now=now, until=None if arg is None else now + arg)
        if op != "allows":
            assert (transition.new if transition else None) is expected, (i, breaker)
        if transition is not None:
            seen.append(transition)
    return seen


def test_CircuitBreaker_opens_after_consecutive_failures() -> None:
    """The third failure in a row opens a breaker set to trip at three."""
    clock = FakeClock()
    breaker = CircuitBreaker("a", consecutive_failures=3)
    seen = run(
        breaker,
        clock,
        [("record", F, None), ("record", F, None), ("record", F, OPEN), ("allows", None, False)],
    )
    assert seen[0].reason == "3 consecutive failures"
    assert breaker.open_until == clock.now() + 5.0
    assert breaker.trips == 1


def test_CircuitBreaker_success_resets_consecutive_count() -> None:
    """A success between failures restarts the consecutive count."""
    clock = FakeClock()
    breaker = CircuitBreaker("a", consecutive_failures=3)
    run(
        breaker,
        clock,
        [
            ("record", F, None),
            ("record", F, None),
            ("record", S, None),
            ("record", F, None),
            ("record", F, None),
            ("state", None, CLOSED),
        ],
    )


def test_CircuitBreaker_opens_on_failure_rate_once_min_requests_seen() -> None:
    """Half the outcomes failing opens the breaker only once min_requests outcomes are in."""
    clock = FakeClock()
    breaker = CircuitBreaker("a", consecutive_failures=100, failure_rate=0.5, min_requests=10)
    steps: list[Step] = [("record", S, None), ("record", F, None)] * 4
    steps += [("record", S, None), ("record", F, OPEN)]
    seen = run(breaker, clock, steps)
    assert seen[0].reason == "failure rate 50% >= 50% over 10 requests in 30s"


def test_CircuitBreaker_failure_rate_forgets_outcomes_outside_window() -> None:
    """Failures older than the window no longer count toward the rate."""
    clock = FakeClock()
    breaker = CircuitBreaker("a", consecutive_failures=100, min_requests=4, window_s=10.0)
    run(
        breaker,
        clock,
        [
            ("record", F, None),
            ("record", F, None),
            ("record", S, None),
            ("wait", 11.0, None),
            ("record", S, None),
            ("record", S, None),
            ("record", S, None),
            ("record", F, None),
            ("state", None, CLOSED),
        ],
    )


def test_CircuitBreaker_half_open_after_cooldown() -> None:
    """Once the cool-down passes, state() reads HALF_OPEN and allows() admits a probe."""
    clock = FakeClock()
    breaker = CircuitBreaker("a", consecutive_failures=1, base_cooldown_s=5.0)
    seen = run(
        breaker,
        clock,
        [
            ("record", F, OPEN),
            ("wait", 4.9, None),
            ("allows", None, False),
            ("state", None, OPEN),
            ("wait", 0.1, None),
            ("state", None, HALF),
            ("allows", None, True),
            ("state", None, HALF),
            ("allows", None, False),
        ],
    )
    assert [(t.old, t.new) for t in seen] == [(CLOSED, OPEN), (OPEN, HALF)]
    assert breaker.open_until is None


def test_CircuitBreaker_allows_returns_probe_admission() -> None:
    """The admission that moves OPEN to HALF_OPEN is a probe and carries the transition."""
    clock = FakeClock()
    breaker = CircuitBreaker("a", consecutive_failures=1)
    breaker.record(F, now=clock.now())
    assert breaker.allows(now=clock.now()) == Admission(allowed=False)
    admission = breaker.allows(now=clock.advance(5.0))
    assert admission.allowed and admission.probe
    assert admission.transition is not None
    assert admission.transition.reason == "cool-down to 105 passed (trip 1)"
    closed = CircuitBreaker("b").allows(now=clock.now())
    assert closed == Admission(allowed=True, probe=False, transition=None)


def test_CircuitBreaker_half_open_limits_concurrent_probes() -> None:
    """HALF_OPEN admits at most half_open_probes requests until one reports back."""
    clock = FakeClock()
    breaker = CircuitBreaker("a", consecutive_failures=1, half_open_probes=2)
    run(
        breaker,
        clock,
        [
            ("record", F, OPEN),
            ("wait", 5.0, None),
            ("allows", None, True),
            ("allows", None, True),
            ("allows", None, False),
        ],
    )
    assert repr(breaker) == "<CircuitBreaker target=a HALF_OPEN probes=2/2 trips=1>"


def test_CircuitBreaker_probe_success_closes() -> None:
    """A successful probe closes the breaker and lets everything through."""
    clock = FakeClock()
    breaker = CircuitBreaker("a", consecutive_failures=1)
    seen = run(
        breaker,
        clock,
        [
            ("record", F, OPEN),
            ("wait", 5.0, None),
            ("allows", None, True),
            ("record", S, CLOSED),
            ("allows", None, True),
            ("allows", None, True),
        ],
    )
    assert seen[-1].reason == "probe succeeded"


COOLDOWN_CASES = [
    # (base, max, cool-downs for trips 1, 2, 3, ...)
    (5.0, 300.0, [5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 300.0, 300.0]),
    (1.0, 3.0, [1.0, 2.0, 3.0, 3.0]),
    (2.0, 2.0, [2.0, 2.0]),
]


@pytest.mark.parametrize(("base", "cap", "cooldowns"), COOLDOWN_CASES)
def test_CircuitBreaker_probe_failure_reopens_with_longer_cooldown(
    base: float, cap: float, cooldowns: list[float]
) -> None:
    """Each failed probe re-opens for twice the last cool-down, up to max_cooldown_s."""
    clock = FakeClock()
    breaker = CircuitBreaker("a", consecutive_failures=1, base_cooldown_s=base, max_cooldown_s=cap)
    breaker.record(F, now=clock.now())
    for trip, cooldown in enumerate(cooldowns, start=1):
        assert breaker.trips == trip
        assert breaker.open_until == pytest.approx(clock.now() + cooldown)
        clock.advance(cooldown)
        assert breaker.allows(now=clock.now())
        transition = breaker.record(F, now=clock.now())
        assert transition is not None
        assert (transition.old, transition.new, transition.reason) == (HALF, OPEN, "probe failed")


#: Trip, fail the probe (second trip, 10 s cool-down), then a probe success closes it.
_TWO_TRIPS_THEN_CLOSED = [
    ("record", F, OPEN),
    ("wait", 5.0, None),
    ("allows", None, True),
    ("record", F, OPEN),
    ("wait", 10.0, None),
    ("allows", None, True),
    ("record", S, CLOSED),
]


def test_CircuitBreaker_trip_streak_survives_a_quick_relapse() -> None:
    """An upstream that fails again soon after closing gets the longer cool-down."""
    clock = FakeClock()
    breaker = CircuitBreaker("a", consecutive_failures=1, quiet_s=60.0)
    run(
        breaker,
        clock,
        [
            *_TWO_TRIPS_THEN_CLOSED,
            ("wait", 59.0, None),
            ("record", F, OPEN),
        ],
    )
    assert breaker.trips == 3
    assert breaker.open_until == clock.now() + 20.0


def test_CircuitBreaker_trip_streak_forgotten_after_quiet_period() -> None:
    """After quiet_s in CLOSED, the next trip starts again at the base cool-down."""
    clock = FakeClock()
    breaker = CircuitBreaker("a", consecutive_failures=1, quiet_s=60.0)
    run(
        breaker,
        clock,
        [
            *_TWO_TRIPS_THEN_CLOSED,
            ("wait", 60.0, None),
            ("allows", None, True),
        ],
    )
    assert breaker.trips == 0
    run(breaker, clock, [("record", F, OPEN)])
    assert (breaker.trips, breaker.total_trips) == (1, 3)
    assert breaker.open_until == clock.now() + 5.0


def test_CircuitBreaker_trip_forces_open_until_given_time() -> None:
    """trip(until=...) opens for exactly that long, as a Retry-After asks, streak unchanged."""
    clock = FakeClock()
    breaker = CircuitBreaker("a")
    transition = breaker.trip(now=clock.now(), until=clock.now() + 30.0, reason="429 Retry-After")
    assert transition == BreakerTransition(
        target="a", old=CLOSED, new=OPEN, reason="429 Retry-After", at=100.0, open_until=130.0
    )
    assert repr(breaker) == "<CircuitBreaker target=a OPEN until=130 trips=0>"
    run(breaker, clock, [("wait", 29.9, None), ("allows", None, False), ("wait", 0.1, None)])
    run(breaker, clock, [("allows", None, True)])


def test_CircuitBreaker_trip_while_open_only_extends() -> None:
    """Tripping an open breaker returns None, never shortens the cool-down, nor grows the streak."""
    clock = FakeClock()
    breaker = CircuitBreaker("a")
    run(breaker, clock, [("trip", 30.0, OPEN), ("trip", 10.0, None), ("trip", 60.0, None)])
    assert breaker.open_until == 160.0
    assert (breaker.trips, breaker.total_trips) == (0, 1)


def test_CircuitBreaker_trip_in_half_open_reopens() -> None:
    """A forced trip during HALF_OPEN re-opens it, and the probe's late answer is ignored."""
    clock = FakeClock()
    breaker = CircuitBreaker("a", consecutive_failures=1)
    run(
        breaker,
        clock,
        [
            ("record", F, OPEN),
            ("wait", 5.0, None),
            ("allows", None, True),
            ("trip", None, OPEN),
            ("record", S, None),
            ("state", None, OPEN),
        ],
    )
    assert breaker.open_until == clock.now() + 10.0


def test_CircuitBreaker_trip_until_in_past_means_now() -> None:
    """A Retry-After already past opens the breaker with the cool-down already over."""
    clock = FakeClock()
    breaker = CircuitBreaker("a")
    run(breaker, clock, [("trip", -5.0, OPEN), ("state", None, HALF), ("allows", None, True)])


def test_CircuitBreaker_late_outcomes_ignored_while_open() -> None:
    """Outcomes of requests admitted before the trip change nothing while OPEN."""
    clock = FakeClock()
    breaker = CircuitBreaker("a", consecutive_failures=1)
    run(
        breaker,
        clock,
        [
            ("record", F, OPEN),
            ("record", F, None),
            ("record", S, None),
            ("wait", 5.0, None),
            ("record", S, None),
            ("state", None, HALF),
            ("allows", None, True),
        ],
    )
    assert breaker.trips == 1


def test_CircuitBreaker_late_outcome_in_half_open_without_probe_ignored() -> None:
    """With no probe out, a HALF_OPEN breaker neither closes nor re-opens on an outcome."""
    clock = FakeClock()
    breaker = CircuitBreaker("a", consecutive_failures=1)
    run(
        breaker,
        clock,
        [("record", F, OPEN), ("wait", 5.0, None), ("allows", None, True)],
    )
    breaker.abandon_probe(now=clock.now())
    run(breaker, clock, [("record", S, None), ("record", F, None), ("state", None, HALF)])


def test_CircuitBreaker_abandon_probe_frees_slot() -> None:
    """An abandoned probe frees its slot for the next request, with no verdict."""
    clock = FakeClock()
    breaker = CircuitBreaker("a", consecutive_failures=1)
    run(breaker, clock, [("record", F, OPEN), ("wait", 5.0, None), ("allows", None, True)])
    run(breaker, clock, [("allows", None, False)])
    breaker.abandon_probe(now=clock.now())
    run(breaker, clock, [("state", None, HALF), ("allows", None, True)])


@pytest.mark.parametrize("setup", ["closed", "open", "half_open_no_probe"])
def test_CircuitBreaker_abandon_probe_without_probe_is_illegal(setup: str) -> None:
    """abandon_probe with no probe out raises RoutingStateError and changes nothing."""
    clock = FakeClock()
    breaker = CircuitBreaker("a", consecutive_failures=1)
    if setup != "closed":
        breaker.record(F, now=clock.now())
    if setup == "half_open_no_probe":
        clock.advance(5.0)
        breaker.allows(now=clock.now())
        breaker.abandon_probe(now=clock.now())
    before = repr(breaker)
    with pytest.raises(RoutingStateError, match="abandon_probe"):
        breaker.abandon_probe(now=clock.now())
    assert repr(breaker) == before


def test_CircuitBreaker_lost_probe_expires() -> None:
    """A probe that never reports back stops holding its slot after probe_timeout_s."""
    clock = FakeClock()
    breaker = CircuitBreaker("a", consecutive_failures=1, probe_timeout_s=60.0)
    run(
        breaker,
        clock,
        [
            ("record", F, OPEN),
            ("wait", 5.0, None),
            ("allows", None, True),
            ("wait", 59.0, None),
            ("allows", None, False),
            ("wait", 1.0, None),
            ("allows", None, True),
        ],
    )


def test_CircuitBreaker_record_rejects_non_outcome() -> None:
    """record with something other than an Outcome raises RoutingStateError, state unchanged."""
    breaker = CircuitBreaker("a")
    with pytest.raises(RoutingStateError):
        breaker.record("failure", now=0.0)  # type: ignore[arg-type]
    assert repr(breaker) == "<CircuitBreaker target=a CLOSED failures=0/0 consecutive=0 trips=0>"


def test_CircuitBreaker_repr_closed() -> None:
    """repr of a CLOSED breaker shows window failures and the consecutive count."""
    breaker = CircuitBreaker("a")
    breaker.record(S, now=0.0)
    breaker.record(F, now=0.0)
    assert repr(breaker) == "<CircuitBreaker target=a CLOSED failures=1/2 consecutive=1 trips=0>"


def test_CircuitBreaker_transition_table() -> None:
    """The table holds exactly the documented edges."""
    assert {(old, new) for (old, _), new in _TRANSITIONS.items()} == {
        (CLOSED, OPEN),
        (OPEN, HALF),
        (OPEN, CLOSED),
        (HALF, CLOSED),
        (HALF, OPEN),
    }
    assert len(_TRANSITIONS) == 7


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"consecutive_failures": 0}, "consecutive_failures"),
        ({"failure_rate": 0.0}, "failure_rate"),
        ({"failure_rate": 1.5}, "failure_rate"),
        ({"min_requests": 0}, "min_requests"),
        ({"base_cooldown_s": 0.0}, "base_cooldown_s"),
        ({"max_cooldown_s": 1.0}, "max_cooldown_s"),
        ({"half_open_probes": 0}, "half_open_probes"),
        ({"window_s": -1.0}, "window_s"),
    ],
)
def test_CircuitBreaker_rejects_bad_args(kwargs: dict[str, Any], name: str) -> None:
    """Out-of-range thresholds raise ValueError naming the argument."""
    with pytest.raises(ValueError, match=name):
        CircuitBreaker("a", **kwargs)


def test_CircuitBreaker_trip_rejects_non_finite_until() -> None:
    """trip(until=inf) raises ValueError and leaves the breaker CLOSED."""
    breaker = CircuitBreaker("a")
    with pytest.raises(ValueError, match="until"):
        breaker.trip(now=0.0, until=float("inf"))
    assert breaker.state(now=0.0) is CLOSED


def test_CircuitBreaker_default_cooldowns_stay_within_half_a_minute() -> None:
    """With the defaults, failed probes re-open for 5, 10, 20, then at most 30 s."""
    clock = FakeClock()
    breaker = CircuitBreaker("a", consecutive_failures=1)
    breaker.record(F, now=clock.now())
    cooldowns = []
    for _ in range(6):
        assert breaker.open_until is not None
        cooldowns.append(breaker.open_until - clock.now())
        clock.advance(cooldowns[-1])
        assert breaker.allows(now=clock.now())
        breaker.record(F, now=clock.now())
    assert cooldowns == [5.0, 10.0, 20.0, 30.0, 30.0, 30.0]


def test_CircuitBreaker_retry_after_trips_do_not_lengthen_the_streak() -> None:
    """Repeated Retry-After trips keep the base cool-down for the next real failure."""
    clock = FakeClock()
    breaker = CircuitBreaker("a", consecutive_failures=1)
    for _ in range(5):  # a burst of 429s, each closed again by a successful probe
        run(breaker, clock, [("trip", 2.0, OPEN), ("wait", 2.0, None), ("allows", None, True),
                             ("record", S, CLOSED)])
    run(breaker, clock, [("record", F, OPEN)])
    assert breaker.trips == 1
    assert breaker.open_until == clock.now() + 5.0


def test_CircuitBreaker_panic_probe_success_closes_before_the_cooldown_ends() -> None:
    """An OPEN breaker admits one panic probe; its success closes the breaker at once."""
    clock = FakeClock()
    breaker = CircuitBreaker("a", consecutive_failures=1)
    run(breaker, clock, [("record", F, OPEN), ("wait", 1.0, None), ("allows", None, False)])
    assert breaker.allows(now=clock.now(), panic=True) == Admission(allowed=True, probe=True)
    assert not breaker.allows(now=clock.now(), panic=True)  # one probe slot
    assert breaker.has_probe_out()
    transition = breaker.record(S, now=clock.now())
    assert transition is not None
    assert (transition.old, transition.new, transition.reason) == (
        OPEN, CLOSED, "a panic probe succeeded")
    assert breaker.allows(now=clock.now())


def test_CircuitBreaker_panic_probe_failure_changes_no_schedule() -> None:
    """A failed panic probe frees its slot; cool-down and streak stay as they were."""
    clock = FakeClock()
    breaker = CircuitBreaker("a", consecutive_failures=1)
    run(breaker, clock, [("record", F, OPEN), ("wait", 1.0, None)])
    until = breaker.open_until
    for _ in range(3):
        assert breaker.allows(now=clock.now(), panic=True)
        assert breaker.record(F, now=clock.now()) is None
    assert (breaker.open_until, breaker.trips) == (until, 1)
    run(breaker, clock, [("wait", 4.0, None), ("allows", None, True), ("record", S, CLOSED)])


def test_CircuitBreaker_retry_after_on_a_panic_probe_frees_its_slot() -> None:
    """A panic probe answered with Retry-After extends the cool-down and frees the slot."""
    clock = FakeClock()
    breaker = CircuitBreaker("a", consecutive_failures=1)
    run(breaker, clock, [("record", F, OPEN)])
    assert breaker.allows(now=clock.now(), panic=True)
    breaker.trip(now=clock.now(), until=clock.now() + 8.0)
    assert not breaker.has_probe_out()
    assert breaker.open_until == clock.now() + 8.0
    assert breaker.allows(now=clock.now(), panic=True)


def test_CircuitBreaker_abandoned_panic_probe_frees_its_slot() -> None:
    """A panic probe whose client went away frees the slot for the next one."""
    clock = FakeClock()
    breaker = CircuitBreaker("a", consecutive_failures=1)
    run(breaker, clock, [("record", F, OPEN)])
    assert breaker.allows(now=clock.now(), panic=True)
    breaker.abandon_probe(now=clock.now())
    assert breaker.allows(now=clock.now(), panic=True)
