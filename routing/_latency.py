"""Latency signals: a windowed sample tracker, a slow/healthy detector, a ramp.

Rules / Theory of operation
---------------------------
``LatencyTracker`` keeps time-to-first-token samples (passive: skyroute's own
traffic). Samples live in a deque bounded twice: by age (``window_s``) and by
count (``max_samples``, oldest dropped first), so memory is constant under any
load. ``p95`` is the nearest-rank 95th percentile of the samples still in the
window, ``None`` when there are none. The sorted copy is cached until the next
change, so asking for p95 on every routing decision costs a sort only when a
sample arrived or expired. ``ewma`` is an exponentially weighted moving average
over *all* samples ever seen (weight ``alpha`` on the newest); it does not age
out and is meant for display and tie-breaking, not for the slow decision.

``SlowDetector`` turns a stream of estimates (a p95 from the tracker, or from
Prometheus) into HEALTHY/SLOW with hysteresis, so a target near the line does
not flap::

    HEALTHY --ABOVE-----> SLOW       estimate > threshold_s, at once
    SLOW    --RECOVERED-> HEALTHY    recover_intervals feeds in a row
                                     below threshold_s * recover_ratio

A feed between the two lines, or above the threshold, restarts the count.
Every other (state, band) pair leaves the state as it is: all feeds are legal.
Each change is returned from ``feed`` as a ``SlowTransition`` that names no
target; the caller knows which target it fed.

``RecoveryRamp`` (Envoy's "slow start") makes recovered traffic come back
gradually: its ``share`` rises linearly from ``floor`` to 1.0 over ``ramp_s``
seconds after ``start``. ``SlowDetector.share`` is 0.0 while SLOW and follows
its own ramp after recovery; the router multiplies a target's weight by it.

Time is always the ``now`` argument; nothing here reads a clock.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass
from typing import final

__all__ = [
    "LatencyTracker",
    "RecoveryRamp",
    "SlowDetector",
    "SlowState",
    "SlowTransition",
]


def _check_finite(name: str, value: float, *, low: float, inclusive: bool = True) -> None:
    ok = math.isfinite(value) and (value >= low if inclusive else value > low)
    if not ok:
        sign = ">=" if inclusive else ">"
        raise ValueError(f"{name} must be a finite number {sign} {low:g}, got {value!r}")


@final
class LatencyTracker:
    """Recent latency samples of one target: p95 over a window, and an EWMA."""

    __slots__ = ("_samples", "_sorted", "alpha", "ewma", "max_samples", "window_s")

    def __init__(self, *, window_s: float = 60.0, alpha: float = 0.3, max_samples: int = 1024):
        """Create an empty tracker.

        Args:
            window_s: samples older than this many seconds are forgotten.
            alpha: EWMA weight of the newest sample, in (0, 1].
            max_samples: most samples kept; the oldest go first.

        Raises:
            ValueError: if an argument is out of range.
        """
        _check_finite("window_s", window_s, low=0.0, inclusive=False)
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples!r}")
        self.window_s = window_s
        self.alpha = alpha
        self.max_samples = max_samples
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_samples)  # (at, seconds)
        self._sorted: list[float] | None = None
        #: The exponentially weighted mean of all samples, ``None`` before any (read per
        #: request by the router: a plain attribute, set only by ``record``).
        self.ewma: float | None = None

    def record(self, seconds: float, *, now: float) -> None:
        """Add one latency sample (e.g. time to first token).

        Args:
            seconds: the measured latency, >= 0.
            now: when it was measured.

        Raises:
            ValueError: if ``seconds`` is negative or not finite; nothing is
                recorded.
        """
        if not 0.0 <= seconds < math.inf:  # the error, and NaN, from _check_finite
            _check_finite("seconds", seconds, low=0.0)
        self._samples.append((now, seconds))
        self._sorted = None
        ewma = self.ewma
        self.ewma = seconds if ewma is None else ewma + self.alpha * (seconds - ewma)

    def _expire(self, now: float) -> None:
        horizon = now - self.window_s
        while self._samples and self._samples[0][0] < horizon:
            self._samples.popleft()
            self._sorted = None

    def count(self, *, now: float) -> int:
        """Return how many samples are in the window ending at ``now``."""
        self._expire(now)
        return len(self._samples)

    def percentile(self, q: float, *, now: float) -> float | None:
        """Return the nearest-rank ``q`` quantile of the samples in the window.

        Args:
            q: the quantile, in (0, 1] (0.95 for p95).
            now: the current time in seconds.

        Returns:
            The sample at rank ``ceil(q * n)``, or ``None`` with no samples.

        Raises:
            ValueError: if ``q`` is outside (0, 1].
        """
        if not 0.0 < q <= 1.0:
            raise ValueError(f"q must be in (0, 1], got {q!r}")
        self._expire(now)
        if not self._samples:
            return None
        if self._sorted is None:
            self._sorted = sorted(s for _, s in self._samples)
        return self._sorted[math.ceil(q * len(self._sorted)) - 1]

    def p95(self, *, now: float) -> float | None:
        """Return the 95th percentile of the window, or ``None`` if it is empty."""
        return self.percentile(0.95, now=now)

    def __repr__(self) -> str:
        ewma = "-" if self.ewma is None else f"{self.ewma * 1000:.0f}ms"
        return f"<LatencyTracker samples={len(self._samples)} ewma={ewma}>"


@final
class RecoveryRamp:
    """A share of traffic that climbs linearly from ``floor`` to 1 after ``start``."""

    __slots__ = ("floor", "ramp_s", "started_at")

    def __init__(self, *, ramp_s: float = 30.0, floor: float = 0.1) -> None:
        """Create a ramp that is not running (share 1.0).

        Args:
            ramp_s: seconds from ``start`` to a full share; 0 disables ramping.
            floor: the share right after ``start``, in [0, 1].

        Raises:
            ValueError: if an argument is out of range.
        """
        _check_finite("ramp_s", ramp_s, low=0.0)
        if not 0.0 <= floor <= 1.0:
            raise ValueError(f"floor must be in [0, 1], got {floor!r}")
        self.ramp_s = ramp_s
        self.floor = floor
        #: When the running ramp started; None while none runs (the share is 1.0 then).
        self.started_at: float | None = None

    def start(self, *, now: float) -> None:
        """Begin ramping from ``floor`` at ``now`` (restarts a running ramp)."""
        self.started_at = now

    def cancel(self) -> None:
        """Stop ramping; the share is 1.0 again."""
        self.started_at = None

    def share(self, *, now: float) -> float:
        """Return the share of its normal traffic the target should get now.

        Args:
            now: the current time in seconds.

        Returns:
            A number in [floor, 1]; 1.0 when no ramp is running or it ended.
        """
        if self.started_at is None or self.ramp_s == 0.0:
            return 1.0
        elapsed = now - self.started_at
        if elapsed >= self.ramp_s:
            self.started_at = None
            return 1.0
        return self.floor + (1.0 - self.floor) * max(0.0, elapsed) / self.ramp_s

    def __repr__(self) -> str:
        since = "idle" if self.started_at is None else f"since={self.started_at:g}"
        return f"<RecoveryRamp ramp={self.ramp_s:g}s floor={self.floor:g} {since}>"


class SlowState(enum.Enum):
    HEALTHY = "healthy"
    SLOW = "slow"


class _Band(enum.Enum):
    ABOVE = "above"  # > threshold
    BETWEEN = "between"  # between the recovery line and the threshold
    BELOW = "below"  # < recovery line, not yet for long enough
    RECOVERED = "recovered"  # < recovery line for recover_intervals feeds


_TRANSITIONS: dict[tuple[SlowState, _Band], SlowState] = {
    (SlowState.HEALTHY, _Band.ABOVE): SlowState.SLOW,
    (SlowState.SLOW, _Band.RECOVERED): SlowState.HEALTHY,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class SlowTransition:
    """A change between HEALTHY and SLOW; the caller adds the target."""

    old: SlowState
    new: SlowState
    estimate_s: float
    threshold_s: float
    source: str
    reason: str
    at: float


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


@final
class SlowDetector:
    """HEALTHY/SLOW for one target from latency estimates, with hysteresis."""

    __slots__ = (
        "_below",
        "_line",
        "_ramp",
        "_state",
        "recover_intervals",
        "recover_ratio",
        "threshold_s",
    )

    def __init__(
        self,
        *,
        threshold_s: float = 0.2,
        recover_ratio: float = 0.8,
        recover_intervals: int = 3,
        ramp_s: float = 30.0,
        ramp_floor: float = 0.1,
    ) -> None:
        """Create a HEALTHY detector.

        Args:
            threshold_s: an estimate above this makes the target SLOW.
            recover_ratio: recovery needs estimates below threshold_s * this.
            recover_intervals: how many such estimates in a row.
            ramp_s: seconds for traffic to come back in full after recovery.
            ramp_floor: share of traffic right after recovery.

        Raises:
            ValueError: if an argument is out of range.
        """
        _check_finite("threshold_s", threshold_s, low=0.0, inclusive=False)
        if not 0.0 < recover_ratio <= 1.0:
            raise ValueError(f"recover_ratio must be in (0, 1], got {recover_ratio!r}")
        if recover_intervals < 1:
            raise ValueError(f"recover_intervals must be >= 1, got {recover_intervals!r}")
        self.threshold_s = threshold_s
        self.recover_ratio = recover_ratio
        self.recover_intervals = recover_intervals
        # Rounded so that 0.2 * 0.8 is the 0.16 a user wrote, not 0.16000000000000003.
        self._line = round(threshold_s * recover_ratio, 12)
        self._ramp = RecoveryRamp(ramp_s=ramp_s, floor=ramp_floor)
        self._state = SlowState.HEALTHY
        self._below = 0

    @property
    def state(self) -> SlowState:
        """The current state."""
        return self._state

    @property
    def ramp(self) -> RecoveryRamp:
        """The recovery ramp (the same object for the detector's life)."""
        return self._ramp

    def set_threshold(self, threshold_s: float) -> None:
        """Judge the next estimates against ``threshold_s`` (a reload changed it).

        The state stays as it is until the next estimate; a recovery under way starts
        counting again, against the new line.

        Raises:
            ValueError: if ``threshold_s`` is not a finite number > 0; nothing changes.
        """
        _check_finite("threshold_s", threshold_s, low=0.0, inclusive=False)
        if threshold_s == self.threshold_s:
            return
        self.threshold_s = threshold_s
        self._line = round(threshold_s * self.recover_ratio, 12)
        self._below = 0

    def _band(self, estimate_s: float) -> _Band:
        if estimate_s > self.threshold_s:
            return _Band.ABOVE
        if estimate_s >= self._line:
            return _Band.BETWEEN
        if self._below + 1 >= self.recover_intervals:
            return _Band.RECOVERED
        return _Band.BELOW

    def feed(
        self, estimate_s: float, *, source: str, now: float, metric: str = "p95"
    ) -> SlowTransition | None:
        """Take one latency estimate for this target.

        Args:
            estimate_s: the estimate in seconds (e.g. a p95 of first-token time).
            source: where it came from ("prometheus", "passive"), for the reason.
            now: the current time in seconds.
            metric: what the estimate is ("p95", "ewma"), for the reason.

        Returns:
            The transition this estimate caused, or ``None``.

        Raises:
            ValueError: if ``estimate_s`` is negative or not finite; the
                detector is unchanged.
        """
        _check_finite("estimate_s", estimate_s, low=0.0)
        band = self._band(estimate_s)
        counting = self._state is SlowState.SLOW and band in (_Band.BELOW, _Band.RECOVERED)
        self._below = self._below + 1 if counting else 0
        new = _TRANSITIONS.get((self._state, band))
        if new is None:
            return None
        if new is SlowState.SLOW:
            reason = f"{metric} {_ms(estimate_s)} > {_ms(self.threshold_s)}, source {source}"
            self._ramp.cancel()
        else:
            reason = (
                f"{metric} {_ms(estimate_s)} < {_ms(self._line)} for {self._below} intervals,"
                f" source {source}"
            )
            self._ramp.start(now=now)
        old, self._state, self._below = self._state, new, 0
        return SlowTransition(
            old=old,
            new=new,
            estimate_s=estimate_s,
            threshold_s=self.threshold_s,
            source=source,
            reason=reason,
            at=now,
        )

    def share(self, *, now: float) -> float:
        """Return the share of its normal traffic the target should get.

        Args:
            now: the current time in seconds.

        Returns:
            0.0 while SLOW; after recovery, a linear ramp up to 1.0.
        """
        if self._state is SlowState.SLOW:
            return 0.0
        return self._ramp.share(now=now)

    def __repr__(self) -> str:
        return (
            f"<SlowDetector {self._state.name} threshold={_ms(self.threshold_s)}"
            f" below={self._below}/{self.recover_intervals}>"
        )
