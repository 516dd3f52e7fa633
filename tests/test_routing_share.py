"""TrafficShare: recent per-route traffic shares, driven by a fake clock."""

from __future__ import annotations

import pytest
from skyroute.routing import TrafficShare

from .fakes import FakeClock

# (the upstream that served each request, in order) -> the shares expected
SIMPLE_CASES = [
    ([], {}),
    (["a"], {"a": 1.0}),
    (["a", "b", "a", "b"], {"a": 0.5, "b": 0.5}),
    (["a", "a", "a", "c"], {"a": 0.75, "c": 0.25}),
]


@pytest.mark.parametrize(("served", "expected"), SIMPLE_CASES)
def test_TrafficShare_share_is_each_upstreams_fraction(served, expected):
    """Shares are the fraction of the route's requests each upstream served."""
    clock = FakeClock()
    share = TrafficShare(window_s=10.0)
    for name in served:
        share.record_served("chat", name, clock.now())
        clock.advance(0.1)
    assert share.share("chat", now=clock.now()) == pytest.approx(expected)


def test_TrafficShare_forgets_requests_older_than_the_window():
    """Requests leave the window once it has passed them: old traffic stops counting."""
    clock = FakeClock()
    share = TrafficShare(window_s=10.0)
    for _ in range(10):
        share.record_served("chat", "slow", clock.now())
    clock.advance(5.0)
    for _ in range(10):
        share.record_served("chat", "fast", clock.now())
    assert share.share("chat", now=clock.now()) == {"slow": 0.5, "fast": 0.5}
    clock.advance(6.0)  # 11 s after the "slow" ones, 6 s after the "fast" ones
    assert share.share("chat", now=clock.now()) == {"fast": 1.0}
    clock.advance(5.0)
    assert share.share("chat", now=clock.now()) == {}


def test_TrafficShare_keeps_routes_apart():
    """Each route has its own shares."""
    clock = FakeClock()
    share = TrafficShare()
    share.record_served("chat", "a", clock.now())
    share.record_served("embed", "b", clock.now())
    assert share.share("chat", now=clock.now()) == {"a": 1.0}
    assert share.counts("embed", now=clock.now()) == {"b": 1}
    assert share.share("code", now=clock.now()) == {}


def test_TrafficShare_memory_is_bounded_by_buckets_not_requests():
    """A long busy run keeps at most one window of buckets, however many requests."""
    clock = FakeClock()
    share = TrafficShare(window_s=1.0)
    for i in range(20_000):
        share.record_served("chat", "abc"[i % 3], clock.now())
        clock.advance(0.001)
    assert len(share._buckets["chat"]) <= 11
    assert sum(share.counts("chat", now=clock.now()).values()) <= 1_100


def test_TrafficShare_forget_drops_removed_routes():
    """After a reload removes a route, its counts go too."""
    clock = FakeClock()
    share = TrafficShare()
    share.record_served("old", "a", clock.now())
    share.record_served("chat", "a", clock.now())
    share.forget({"chat"})
    assert share.share("old", now=clock.now()) == {}
    assert share.share("chat", now=clock.now()) == {"a": 1.0}
    assert repr(share) == "<TrafficShare window=10s [chat:1]>"


@pytest.mark.parametrize("window", [0.0, -1.0, float("nan"), float("inf")])
def test_TrafficShare_rejects_a_window_that_is_not_positive(window):
    """A window must be a positive, finite number of seconds."""
    with pytest.raises(ValueError, match="window_s"):
        TrafficShare(window_s=window)
