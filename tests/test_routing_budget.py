"""Tests for routing._budget: the sliding-window retry (and hedge) budget."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from skyroute.routing._budget import BucketedCounts, BudgetStats, RetryBudget, _bucket_start

from .fakes import FakeClock

# Scripts: (seconds to advance, action, expected answer). "request" records one
# original request; "retry" is try_acquire and expects True or False.
SCRIPTS = {
    "floor_allows_min_per_s_times_window": (
        {"ratio": 0.2, "window_s": 10.0, "min_per_s": 0.3},
        [(0, "retry", True), (0, "retry", True), (0, "retry", True), (0, "retry", False)],
    ),
    "ratio_of_requests_above_floor": (
        {"ratio": 0.5, "window_s": 10.0, "min_per_s": 0.0},
        [(0, "retry", False)]
        + [(0, "request", None)] * 4
        + [(0, "retry", True), (0, "retry", True), (0, "retry", False)],
    ),
    "window_slides_and_budget_refills": (
        {"ratio": 0.0, "window_s": 10.0, "min_per_s": 0.1},
        [(0, "retry", True), (1, "retry", False), (8.9, "retry", False), (0.1, "retry", True)],
    ),
    "old_requests_stop_funding_retries": (
        {"ratio": 1.0, "window_s": 10.0, "min_per_s": 0.0},
        [(0, "request", None), (11, "retry", False), (0, "request", None), (0, "retry", True)],
    ),
}


@pytest.mark.parametrize(("kwargs", "script"), SCRIPTS.values(), ids=SCRIPTS.keys())
def test_RetryBudget_scripts(
    kwargs: dict[str, float], script: list[tuple[float, str, object]]
) -> None:
    """Each scripted request/retry sequence gets exactly the expected answers."""
    clock = FakeClock()
    budget = RetryBudget(**kwargs)
    for step, (advance, action, expected) in enumerate(script):
        clock.advance(advance)
        if action == "request":
            budget.record_request(clock.now())
        else:
            assert budget.try_acquire(clock.now()) is expected, (step, budget)


def test_RetryBudget_twenty_percent_of_traffic() -> None:
    """With the defaults, 100 requests in the window fund exactly 20 retries."""
    clock = FakeClock()
    budget = RetryBudget(ratio=0.2, window_s=10.0, min_per_s=1.0)
    for _ in range(100):
        budget.record_request(clock.now())
        clock.advance(0.05)
    granted = sum(budget.try_acquire(clock.now()) for _ in range(50))
    assert granted == 20


def test_RetryBudget_refused_retry_is_not_counted() -> None:
    """A refused try_acquire leaves the retry count unchanged."""
    clock = FakeClock()
    budget = RetryBudget(ratio=0.0, window_s=10.0, min_per_s=0.1)
    assert budget.try_acquire(clock.now())
    assert not budget.try_acquire(clock.now())
    assert budget.stats(clock.now()).retries == 1


def test_RetryBudget_stats() -> None:
    """stats reports the window's requests, retries, allowance and what is left."""
    clock = FakeClock()
    budget = RetryBudget(ratio=0.2, window_s=10.0, min_per_s=0.1)
    for _ in range(12):
        budget.record_request(clock.now())
    budget.try_acquire(clock.now())
    stats = budget.stats(clock.now())
    assert (stats.requests, stats.retries, stats.remaining) == (12, 1, 2)
    assert stats.allowance == pytest.approx(2.4)
    clock.advance(30.0)
    assert budget.stats(clock.now()) == BudgetStats(
        requests=0, retries=0, allowance=1.0, remaining=1
    )


def test_RetryBudget_as_hedge_budget() -> None:
    """At ratio 0.05 with no floor, 200 requests fund 10 hedges."""
    clock = FakeClock()
    hedges = RetryBudget(ratio=0.05, window_s=10.0, min_per_s=0.0)
    for _ in range(200):
        hedges.record_request(clock.now())
    assert sum(hedges.try_acquire(clock.now()) for _ in range(20)) == 10


def test_RetryBudget_repr() -> None:
    """repr summarises ratio, window and counts."""
    budget = RetryBudget(ratio=0.2, window_s=10.0, min_per_s=1.0)
    budget.record_request(5.0)
    assert repr(budget) == "<RetryBudget ratio=0.2 window=10.0s requests=1 retries=0 allowance=10>"


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"ratio": -0.1}, "ratio"),
        ({"window_s": 0.0}, "window_s"),
        ({"window_s": float("inf")}, "window_s"),
        ({"min_per_s": -1.0}, "min_per_s"),
        ({"min_per_s": float("nan")}, "min_per_s"),
    ],
)
def test_RetryBudget_rejects_bad_args(kwargs: dict[str, float], name: str) -> None:
    """Out-of-range arguments raise ValueError naming the argument."""
    with pytest.raises(ValueError, match=name):
        RetryBudget(**kwargs)


def test_BucketedCounts_expire_by_whole_bucket() -> None:
    """Counts leave the window one bucket (a tenth of the window) at a time."""
    counts = BucketedCounts(window_s=10.0, fields=2)
    counts.add(0, now=100.0)
    counts.add(1, now=100.5, n=3)
    assert counts.totals(now=109.9) == (1, 3)
    assert counts.totals(now=110.0) == (0, 0)


def test_BucketedCounts_late_time_lands_in_newest_bucket() -> None:
    """A now older than the newest bucket is counted, not rejected."""
    counts = BucketedCounts(window_s=10.0, fields=1)
    counts.add(0, now=105.0)
    counts.add(0, now=103.0)
    assert counts.totals(now=105.0) == (2,)
    assert counts.totals(now=115.0) == (0,)


def test_BucketedCounts_memory_is_bounded() -> None:
    """However long it runs, the window holds at most its ten buckets."""
    counts = BucketedCounts(window_s=10.0, fields=1)
    for i in range(10_000):
        counts.add(0, now=i * 0.37)
    assert len(counts._buckets) <= 10
    assert counts.peek()[0] == sum(1 for i in range(10_000) if i * 0.37 >= 3690.0)


def test_BucketedCounts_rejects_bad_field() -> None:
    """Adding to a counter that does not exist raises IndexError."""
    counts = BucketedCounts(window_s=1.0, fields=1)
    with pytest.raises(IndexError):
        counts.add(1, now=0.0)


@settings(max_examples=500, deadline=None)
@given(st.floats(min_value=1e-3, max_value=1e4), st.integers(min_value=-10**6, max_value=10**9))
def test_a_bucket_starts_exactly_where_its_index_begins(bucket_s: float, index: int) -> None:
    """``add`` compares ``now`` with ``_bucket_start`` instead of flooring ``now / bucket_s``:
    the two must agree at every float, so the start is the first float of that index."""
    start = _bucket_start(index, bucket_s)
    assert math.floor(start / bucket_s) >= index
    assert math.floor(math.nextafter(start, -math.inf) / bucket_s) < index


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.floats(min_value=0.0, max_value=0.35)),
                max_size=60), st.sampled_from([0.3, 1.0, 0.7, 10.0]))
def test_counts_match_a_plain_recount(steps: list[tuple[int, float]], window_s: float) -> None:
    """Every add lands in the bucket ``floor(now / bucket_s)`` (a late one in the newest);
    the totals equal a recount of the adds whose bucket is still in the window."""
    counts = BucketedCounts(window_s=window_s, fields=2)
    bucket_s = window_s / 10
    now, newest, added = 0.0, None, []
    for field, step in steps:
        now += step
        index = math.floor(now / bucket_s)
        newest = index if newest is None or index > newest else newest
        counts.add(field, now=now)
        added.append((newest, field))
        expected = [0, 0]
        for at, f in added:
            if at >= index - 9:
                expected[f] += 1
        assert counts.totals(now=now) == tuple(expected)
