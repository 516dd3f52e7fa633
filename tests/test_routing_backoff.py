"""Tests for routing._backoff: jittered exponential backoff as one pure generator."""

from __future__ import annotations

import itertools
import random

import pytest
from skyroute.routing import Jitter, backoff_delays


class _CeilingRng(random.Random):
    """A real ``random.Random`` whose ``uniform`` returns its upper bound, exposing the ceiling."""

    def uniform(self, a: float, b: float) -> float:
        assert a == 0.0
        return b


class _BoundsRng(random.Random):
    """A real ``random.Random`` whose ``uniform`` returns the interval it was asked for."""

    def uniform(self, a: float, b: float) -> tuple[float, float]:  # type: ignore[override]
        return (a, b)


CEILING_CASES = [
    # (base_s, cap_s, first ceilings)
    (0.5, 4.0, [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]),
    (1.0, 1.0, [1.0, 1.0, 1.0]),
    (0.1, 1.0, [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]),
    (0.25, 30.0, [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]),
]


@pytest.mark.parametrize(("base_s", "cap_s", "expected"), CEILING_CASES)
def test_backoff_delays_full_ceiling_doubles_up_to_cap(
    base_s: float, cap_s: float, expected: list[float]
) -> None:
    """Attempt n draws from [0, min(cap, base * 2**n)]."""
    delays = backoff_delays(base_s=base_s, cap_s=cap_s, rng=_CeilingRng())
    assert list(itertools.islice(delays, len(expected))) == pytest.approx(expected)


def test_backoff_delays_full_stay_within_ceiling() -> None:
    """Every real draw lies between zero and that attempt's ceiling."""
    delays = backoff_delays(base_s=0.5, cap_s=8.0, rng=random.Random(7))
    for n, delay in enumerate(itertools.islice(delays, 200)):
        assert 0.0 <= delay <= min(8.0, 0.5 * 2**n)


def test_backoff_delays_full_are_reproducible_with_a_seed() -> None:
    """Two generators fed equally seeded rngs yield the same delays."""
    first = backoff_delays(base_s=0.5, cap_s=8.0, rng=random.Random(42))
    second = backoff_delays(base_s=0.5, cap_s=8.0, rng=random.Random(42))
    assert list(itertools.islice(first, 20)) == list(itertools.islice(second, 20))


def test_backoff_delays_full_are_jittered() -> None:
    """Delays for the same attempt differ between clients, which is the point of jitter."""
    firsts = {
        next(backoff_delays(base_s=1.0, cap_s=1.0, rng=random.Random(s))) for s in range(20)
    }
    assert len(firsts) == 20


def test_backoff_delays_full_never_overflow() -> None:
    """Thousands of attempts still yield finite delays at most the cap."""
    delays = backoff_delays(base_s=0.1, cap_s=5.0, rng=random.Random(1))
    last = list(itertools.islice(delays, 5000))[-1]
    assert 0.0 <= last <= 5.0


BAD_ARGS = [
    (0.0, 1.0, "base_s"),
    (-1.0, 1.0, "base_s"),
    (float("nan"), 1.0, "base_s"),
    (float("inf"), 1.0, "base_s"),
    (1.0, 0.5, "cap_s"),
    (1.0, float("inf"), "cap_s"),
]


@pytest.mark.parametrize(("base_s", "cap_s", "names"), BAD_ARGS)
def test_backoff_delays_rejects_bad_args_when_called(
    base_s: float, cap_s: float, names: str
) -> None:
    """Bad arguments raise ValueError naming the argument at call time, before any next()."""
    with pytest.raises(ValueError, match=names):
        backoff_delays(base_s=base_s, cap_s=cap_s, rng=random.Random(0))


def test_backoff_delays_equal_never_waits_less_than_half_the_ceiling() -> None:
    """Equal jitter draws from the upper half of each ceiling: [d/2, d], doubling to the cap
    (statesync redials a peer on this schedule)."""
    delays = backoff_delays(base_s=0.1, cap_s=1.0, rng=_BoundsRng(), jitter=Jitter.EQUAL)
    expected = [(0.05, 0.1), (0.1, 0.2), (0.2, 0.4), (0.4, 0.8), (0.5, 1.0), (0.5, 1.0)]
    assert list(itertools.islice(delays, 6)) == [pytest.approx(pair) for pair in expected]


def test_backoff_delays_equal_real_draws_stay_in_the_upper_half() -> None:
    """Every real equal-jitter draw lies between half the ceiling and the ceiling."""
    delays = backoff_delays(base_s=0.05, cap_s=5.0, rng=random.Random(3), jitter=Jitter.EQUAL)
    for n, delay in enumerate(itertools.islice(delays, 200)):
        ceiling = min(5.0, 0.05 * 2**n)
        assert ceiling / 2 <= delay <= ceiling
