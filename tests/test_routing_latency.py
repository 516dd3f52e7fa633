"""Tests for routing._latency: the sample tracker, the slow detector and the recovery ramp."""

from __future__ import annotations

from typing import Any

import pytest
from skyroute.routing._latency import (
    LatencyTracker,
    RecoveryRamp,
    SlowDetector,
    SlowState,
    SlowTransition,
)

from .fakes import FakeClock

HEALTHY, SLOW = SlowState.HEALTHY, SlowState.SLOW

P95_CASES = [
    # (samples, expected p95) -- nearest rank: the ceil(0.95 * n)-th smallest
    ([0.1], 0.1),
    ([0.3, 0.1, 0.2], 0.3),
    ([i / 100 for i in range(1, 21)], 0.19),
    ([i / 1000 for i in range(100, 0, -1)], 0.095),
]


@pytest.mark.parametrize(("samples", "expected"), P95_CASES)
def test_LatencyTracker_p95_nearest_rank(samples: list[float], expected: float) -> None:
    """p95 is the nearest-rank 95th percentile of the samples in the window."""
    tracker = LatencyTracker()
    for s in samples:
        tracker.record(s, now=100.0)
    assert tracker.p95(now=100.0) == pytest.approx(expected)


def test_LatencyTracker_empty_has_no_estimates() -> None:
    """With no samples, p95 and ewma are None and count is 0."""
    tracker = LatencyTracker()
    assert (tracker.p95(now=0.0), tracker.ewma, tracker.count(now=0.0)) == (None, None, 0)


def test_LatencyTracker_forgets_samples_outside_window() -> None:
    """Samples older than window_s drop out of count and p95."""
    clock = FakeClock()
    tracker = LatencyTracker(window_s=60.0)
    tracker.record(0.9, now=clock.now())
    clock.advance(30.0)
    tracker.record(0.1, now=clock.now())
    assert tracker.p95(now=clock.now()) == 0.9
    clock.advance(30.1)
    assert (tracker.count(now=clock.now()), tracker.p95(now=clock.now())) == (1, 0.1)
    clock.advance(30.0)
    assert tracker.p95(now=clock.now()) is None


def test_LatencyTracker_keeps_at_most_max_samples() -> None:
    """Beyond max_samples, the oldest samples are dropped first."""
    tracker = LatencyTracker(max_samples=3)
    for s in (5.0, 0.1, 0.2, 0.3):
        tracker.record(s, now=0.0)
    assert tracker.count(now=0.0) == 3
    assert tracker.p95(now=0.0) == 0.3


def test_LatencyTracker_p95_sees_new_samples_after_a_query() -> None:
    """A sample recorded after a p95 query is included in the next query."""
    tracker = LatencyTracker()
    tracker.record(0.1, now=0.0)
    assert tracker.p95(now=0.0) == 0.1
    tracker.record(0.5, now=0.0)
    assert tracker.p95(now=0.0) == 0.5


def test_LatencyTracker_ewma() -> None:
    """ewma starts at the first sample and moves alpha of the way to each new one."""
    tracker = LatencyTracker(alpha=0.5)
    tracker.record(0.2, now=0.0)
    assert tracker.ewma == 0.2
    tracker.record(0.4, now=1.0)
    assert tracker.ewma == pytest.approx(0.3)
    tracker.record(0.0, now=2.0)
    assert tracker.ewma == pytest.approx(0.15)
    assert repr(tracker) == "<LatencyTracker samples=3 ewma=150ms>"


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_LatencyTracker_rejects_bad_sample(bad: float) -> None:
    """A negative or non-finite sample raises ValueError and is not recorded."""
    tracker = LatencyTracker()
    with pytest.raises(ValueError, match="seconds"):
        tracker.record(bad, now=0.0)
    assert tracker.count(now=0.0) == 0
    assert tracker.ewma is None


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"window_s": 0.0}, "window_s"), ({"alpha": 0.0}, "alpha"), ({"max_samples": 0}, "max")],
)
def test_LatencyTracker_rejects_bad_args(kwargs: dict[str, Any], name: str) -> None:
    """Out-of-range arguments raise ValueError naming the argument."""
    with pytest.raises(ValueError, match=name):
        LatencyTracker(**kwargs)


def test_LatencyTracker_percentile_rejects_bad_quantile() -> None:
    """A quantile outside (0, 1] raises ValueError."""
    with pytest.raises(ValueError, match="q must be"):
        LatencyTracker().percentile(0.0, now=0.0)


# Scripts of estimates (ms) fed one second apart with threshold 200 ms, recovery
# line 160 ms, 3 intervals; each step names the state expected after the feed.
SLOW_SCRIPTS = {
    "slow_at_once": [(150, HEALTHY), (201, SLOW)],
    "threshold_itself_is_not_slow": [(200, HEALTHY)],
    "recovers_after_three_below": [(300, SLOW), (100, SLOW), (100, SLOW), (100, HEALTHY)],
    "between_lines_resets_count": [
        (300, SLOW),
        (100, SLOW),
        (100, SLOW),
        (180, SLOW),
        (100, SLOW),
        (100, SLOW),
        (100, HEALTHY),
    ],
    "above_resets_count": [(300, SLOW), (100, SLOW), (100, SLOW), (250, SLOW), (100, SLOW)],
    "recovery_line_itself_does_not_count": [(300, SLOW), (160, SLOW), (160, SLOW), (160, SLOW)],
    "flaps_back": [(300, SLOW), (10, SLOW), (10, SLOW), (10, HEALTHY), (400, SLOW)],
}


@pytest.mark.parametrize("script", SLOW_SCRIPTS.values(), ids=SLOW_SCRIPTS.keys())
def test_SlowDetector_scripts(script: list[tuple[int, SlowState]]) -> None:
    """Each scripted estimate leaves the detector in the expected state, with hysteresis."""
    clock = FakeClock()
    detector = SlowDetector(threshold_s=0.2, recover_ratio=0.8, recover_intervals=3)
    for step, (ms, expected) in enumerate(script):
        before = detector.state
        transition = detector.feed(ms / 1000, source="passive", now=clock.now())
        assert detector.state is expected, (step, detector)
        assert (transition is not None) == (before is not expected), step
        clock.advance(1.0)


def test_SlowDetector_slow_transition_value() -> None:
    """Going SLOW returns a transition that says why, with the numbers and the source."""
    detector = SlowDetector(threshold_s=0.2)
    transition = detector.feed(0.312, source="prometheus", now=100.0)
    assert transition == SlowTransition(
        old=HEALTHY,
        new=SLOW,
        estimate_s=0.312,
        threshold_s=0.2,
        source="prometheus",
        reason="p95 312 ms > 200 ms, source prometheus",
        at=100.0,
    )


def test_SlowDetector_recovery_transition_reason() -> None:
    """Recovering returns a transition naming the recovery line and the interval count."""
    detector = SlowDetector(threshold_s=0.2, recover_intervals=2)
    detector.feed(0.3, source="passive", now=0.0)
    assert detector.feed(0.1, source="passive", now=1.0) is None
    transition = detector.feed(0.12, source="passive", now=2.0, metric="ewma")
    assert transition is not None
    assert transition.reason == "ewma 120 ms < 160 ms for 2 intervals, source passive"
    assert (transition.old, transition.new, transition.at) == (SLOW, HEALTHY, 2.0)


def test_SlowDetector_share_ramps_after_recovery() -> None:
    """Share is 0 while SLOW, then climbs linearly from the floor to 1 over ramp_s."""
    clock = FakeClock()
    detector = SlowDetector(recover_intervals=1, ramp_s=30.0, ramp_floor=0.1)
    assert detector.share(now=clock.now()) == 1.0
    detector.feed(0.5, source="passive", now=clock.now())
    assert detector.share(now=clock.now()) == 0.0
    detector.feed(0.1, source="passive", now=clock.advance(10.0))
    assert detector.share(now=clock.now()) == pytest.approx(0.1)
    assert detector.share(now=clock.advance(15.0)) == pytest.approx(0.55)
    assert detector.share(now=clock.advance(15.0)) == 1.0


def test_SlowDetector_going_slow_mid_ramp_cuts_share() -> None:
    """A relapse during the ramp drops the share to 0 and the next recovery restarts the ramp."""
    clock = FakeClock()
    detector = SlowDetector(recover_intervals=1, ramp_s=30.0, ramp_floor=0.0)
    detector.feed(0.5, source="passive", now=clock.now())
    detector.feed(0.1, source="passive", now=clock.advance(1.0))
    clock.advance(15.0)
    detector.feed(0.5, source="passive", now=clock.now())
    assert detector.share(now=clock.now()) == 0.0
    detector.feed(0.1, source="passive", now=clock.advance(1.0))
    assert detector.share(now=clock.advance(3.0)) == pytest.approx(0.1)


def test_SlowDetector_rejects_bad_estimate() -> None:
    """A negative or NaN estimate raises ValueError and leaves the state alone."""
    detector = SlowDetector()
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="estimate_s"):
            detector.feed(bad, source="passive", now=0.0)
    assert detector.state is HEALTHY
    assert repr(detector) == "<SlowDetector HEALTHY threshold=200 ms below=0/3>"


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"threshold_s": 0.0}, "threshold_s"),
        ({"recover_ratio": 1.5}, "recover_ratio"),
        ({"recover_intervals": 0}, "recover_intervals"),
        ({"ramp_s": -1.0}, "ramp_s"),
        ({"ramp_floor": 2.0}, "floor"),
    ],
)
def test_SlowDetector_rejects_bad_args(kwargs: dict[str, Any], name: str) -> None:
    """Out-of-range arguments raise ValueError naming the argument."""
    with pytest.raises(ValueError, match=name):
        SlowDetector(**kwargs)


RAMP_CASES = [
    # (ramp_s, floor, seconds since start, expected share)
    (30.0, 0.1, 0.0, 0.1),
    (30.0, 0.1, 15.0, 0.55),
    (30.0, 0.1, 29.999, pytest.approx(1.0, abs=1e-3)),
    (30.0, 0.1, 30.0, 1.0),
    (30.0, 0.0, 10.0, pytest.approx(1 / 3)),
    (30.0, 0.5, -5.0, 0.5),
    (0.0, 0.1, 0.0, 1.0),
]


@pytest.mark.parametrize(("ramp_s", "floor", "elapsed", "expected"), RAMP_CASES)
def test_RecoveryRamp_share(ramp_s: float, floor: float, elapsed: float, expected: Any) -> None:
    """Share climbs linearly from floor at start to 1.0 at ramp_s, and stays in [floor, 1]."""
    ramp = RecoveryRamp(ramp_s=ramp_s, floor=floor)
    ramp.start(now=100.0)
    assert ramp.share(now=100.0 + elapsed) == expected


def test_RecoveryRamp_idle_and_cancel() -> None:
    """A ramp not started, or cancelled, gives a full share."""
    ramp = RecoveryRamp(ramp_s=30.0, floor=0.1)
    assert ramp.share(now=0.0) == 1.0
    ramp.start(now=0.0)
    assert ramp.share(now=0.0) == pytest.approx(0.1)
    assert repr(ramp) == "<RecoveryRamp ramp=30s floor=0.1 since=0>"
    ramp.cancel()
    assert ramp.share(now=0.0) == 1.0
    assert repr(ramp) == "<RecoveryRamp ramp=30s floor=0.1 idle>"


def test_SlowDetector_set_threshold_judges_the_next_estimates_by_the_new_one() -> None:
    """A new threshold moves the recovery line with it and restarts a recovery count; a bad
    one raises and changes nothing."""
    detector = SlowDetector(threshold_s=0.2, recover_ratio=0.5, recover_intervals=2)
    detector.feed(0.3, source="prometheus", now=0.0)
    detector.feed(0.05, source="prometheus", now=1.0)  # one interval below 0.1
    detector.set_threshold(0.4)  # line 0.2: the count starts again
    assert detector.feed(0.15, source="prometheus", now=2.0) is None
    change = detector.feed(0.15, source="prometheus", now=3.0)
    assert change is not None and change.new is SlowState.HEALTHY
    with pytest.raises(ValueError, match="threshold_s"):
        detector.set_threshold(0.0)
    assert detector.threshold_s == 0.4
