"""Retry budget: a cap on retries as a share of recent traffic.

Rules / Theory of operation
---------------------------
A retry storm turns one sick upstream into a sick fleet: every client request
becomes 1 + N upstream calls just when capacity is lowest. A *retry budget*
(Finagle's ``RetryBudget``, Envoy's ``retry_budget``) bounds the damage by
allowing retries only while they stay a small share of real traffic:

    allowance = max(ratio * requests_in_window, min_per_s * window_s)
    a retry is allowed  <=>  retries_in_window < allowance

* ``record_request(now)`` counts one *original* client request. Retries and
  hedges do not count as requests, so a budget cannot feed itself.
* ``try_acquire(now)`` asks for one retry. If it answers ``True`` the retry is
  already counted; the caller must not ask twice for the same retry.
* ``min_per_s`` is the floor that lets a quiet service still retry at all
  (Finagle's ``minRetriesPerSec``): at 1/s over a 10 s window, 10 retries are
  always allowed, whatever the request count.
* The same class is the hedge budget; use ``ratio=0.05``.

Counts live in a sliding window made of ``_BUCKETS_PER_WINDOW`` fixed-width
buckets (``BucketedCounts``), so memory is constant whatever the request rate,
and the window edge is accurate to one bucket (10 % of the window). Time is
always an argument: nothing here reads a clock. A ``now`` older than the newest
bucket (two tasks racing to report) is counted in the newest bucket rather than
rejected, because callers read the clock before they take turns.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import final

__all__ = ["BucketedCounts", "BudgetStats", "RetryBudget"]

# Ten buckets per window: counts are exact to within 10 % of the window's
# length, and a window of any length costs at most ten small lists.
_BUCKETS_PER_WINDOW = 10


def _check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_non_negative(name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


@final
class BucketedCounts:
    """Several integer counters summed over a sliding time window.

    The window is split into ``buckets`` buckets of ``window_s / buckets``
    seconds; a bucket leaves the window whole once it is older than the window.
    Shared by ``RetryBudget`` and ``CircuitBreaker``.
    """

    __slots__ = ("_bucket_s", "_buckets", "_n_buckets", "_next_start", "_totals", "window_s")

    def __init__(self, *, window_s: float, fields: int, buckets: int = _BUCKETS_PER_WINDOW):
        """Create an empty window.

        Args:
            window_s: length of the window in seconds (> 0).
            fields: how many counters each bucket holds (>= 1).
            buckets: how many buckets make up the window (>= 1).

        Raises:
            ValueError: if an argument is out of range.
        """
        _check_positive("window_s", window_s)
        if fields < 1 or buckets < 1:
            raise ValueError(f"fields and buckets must be >= 1, got {fields}, {buckets}")
        self.window_s = window_s
        self._n_buckets = buckets
        self._bucket_s = window_s / buckets
        # Each entry is [bucket_index, count_0, count_1, ...], oldest first.
        self._buckets: deque[list[int]] = deque()
        self._totals = [0] * fields
        #: The first time past the newest bucket (``-inf`` with none): an ``add`` before it
        #: lands in the newest bucket with one comparison, no division.
        self._next_start = -math.inf

    def _expire(self, now: float) -> int:
        """Drop buckets that left the window; return the bucket index of ``now``."""
        index = math.floor(now / self._bucket_s)
        oldest_kept = index - self._n_buckets + 1
        while self._buckets and self._buckets[0][0] < oldest_kept:
            gone = self._buckets.popleft()
            for i, n in enumerate(gone[1:]):
                self._totals[i] -= n
        if not self._buckets:
            self._next_start = -math.inf
        return index

    def add(self, field: int, *, now: float, n: int = 1) -> None:
        """Add ``n`` to counter ``field`` at time ``now``.

        Args:
            field: which counter (0-based).
            now: the current time in seconds.
            n: how much to add.

        Raises:
            IndexError: if ``field`` is out of range.
        """
        totals = self._totals
        if not 0 <= field < len(totals):
            raise IndexError(f"field {field} out of range 0..{len(totals) - 1}")
        buckets = self._buckets
        # Within the newest bucket (or late) nothing can have left the window since that
        # bucket was made: only a new bucket expires old ones.
        if now >= self._next_start and (
                not buckets or buckets[-1][0] < math.floor(now / self._bucket_s)):
            index = self._expire(now)
            buckets.append([index] + [0] * len(totals))
            self._next_start = _bucket_start(index + 1, self._bucket_s)
        # A late ``now`` (older than the newest bucket) lands in the newest one.
        buckets[-1][1 + field] += n
        totals[field] += n

    def totals(self, *, now: float) -> tuple[int, ...]:
        """Return every counter summed over the window ending at ``now``."""
        self._expire(now)
        return tuple(self._totals)

    def peek(self) -> tuple[int, ...]:
        """Return the totals as of the last call, without expiring anything."""
        return tuple(self._totals)

    def clear(self) -> None:
        """Forget every count."""
        self._buckets.clear()
        self._totals = [0] * len(self._totals)
        self._next_start = -math.inf


def _bucket_start(index: int, bucket_s: float) -> float:
    """The smallest float ``t`` with ``math.floor(t / bucket_s) >= index``: exactly where
    bucket ``index`` starts as ``add`` computes indexes (``index * bucket_s`` may be off by
    an ulp either way). The quotient, rounded or not, only grows with ``t``."""
    start = index * bucket_s
    while math.floor(start / bucket_s) >= index:
        start = math.nextafter(start, -math.inf)
    while math.floor(start / bucket_s) < index:
        start = math.nextafter(start, math.inf)
    return start


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetStats:
    """What a budget holds at one instant (for /metrics and /admin)."""

    requests: int
    retries: int
    allowance: float
    remaining: int


_REQUESTS = 0
_RETRIES = 1


@final
class RetryBudget:
    """Allows retries only while they are a small share of recent requests."""

    __slots__ = ("_counts", "min_per_s", "ratio", "window_s")

    def __init__(
        self, *, ratio: float = 0.2, window_s: float = 10.0, min_per_s: float = 1.0
    ) -> None:
        """Create a budget with an empty window.

        Args:
            ratio: retries allowed per original request (0.2 = 20 %).
            window_s: length of the sliding window in seconds.
            min_per_s: retries per second always allowed, however few requests.

        Raises:
            ValueError: if an argument is negative, not finite, or
                ``window_s`` is zero.
        """
        _check_non_negative("ratio", ratio)
        _check_positive("window_s", window_s)
        _check_non_negative("min_per_s", min_per_s)
        self.ratio = ratio
        self.window_s = window_s
        self.min_per_s = min_per_s
        self._counts = BucketedCounts(window_s=window_s, fields=2)

    def _allowance(self, requests: int) -> float:
        return max(self.ratio * requests, self.min_per_s * self.window_s)

    def record_request(self, now: float) -> None:
        """Count one original (not retried, not hedged) request.

        Args:
            now: the current time in seconds.
        """
        counts = self._counts
        if now < counts._next_start:  # in the newest bucket (the usual case): add, inline
            counts._buckets[-1][1 + _REQUESTS] += 1
            counts._totals[_REQUESTS] += 1
        else:
            counts.add(_REQUESTS, now=now)

    def try_acquire(self, now: float) -> bool:
        """Ask for one retry (or hedge); count it if allowed.

        Args:
            now: the current time in seconds.

        Returns:
            ``True`` if the retry may go ahead (and it is now counted),
            ``False`` if the budget is spent (nothing is counted).
        """
        requests, retries = self._counts.totals(now=now)
        if retries < self._allowance(requests):
            self._counts.add(_RETRIES, now=now)
            return True
        return False

    def stats(self, now: float) -> BudgetStats:
        """Summarise the window ending at ``now``.

        Args:
            now: the current time in seconds.

        Returns:
            requests and retries in the window, the allowance, and how many
            more retries ``try_acquire`` would grant right now.
        """
        requests, retries = self._counts.totals(now=now)
        allowance = self._allowance(requests)
        return BudgetStats(
            requests=requests,
            retries=retries,
            allowance=allowance,
            remaining=max(0, math.ceil(allowance) - retries),
        )

    def __repr__(self) -> str:
        requests, retries = self._counts.peek()
        return (
            f"<RetryBudget ratio={self.ratio} window={self.window_s}s"
            f" requests={requests} retries={retries}"
            f" allowance={self._allowance(requests):g}>"
        )
