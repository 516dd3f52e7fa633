"""Per-upstream circuit breaker: CLOSED -> OPEN -> HALF_OPEN -> CLOSED.

Rules / Theory of operation
---------------------------
States (``BreakerState``) and the events that move between them::

    CLOSED    --TRIPPED--------> OPEN        too many failures (see triggers)
    CLOSED    --FORCED---------> OPEN        trip(): Retry-After, 401/402 bad key
    OPEN      --COOLED_DOWN----> HALF_OPEN   first allows() at/after open_until
    OPEN      --PANIC_PROBE_OK-> CLOSED      a panic probe succeeded (see below)
    HALF_OPEN --PROBE_OK-------> CLOSED      a probe succeeded
    HALF_OPEN --PROBE_FAILED---> OPEN        a probe failed; longer cool-down
    HALF_OPEN --FORCED---------> OPEN

Anything else is not in ``_TRANSITIONS``; asking for it raises
``RoutingStateError`` and changes nothing.

Triggers (checked on every ``record`` while CLOSED):
  * ``consecutive_failures`` failures in a row, or
  * over the sliding ``window_s`` window, at least ``min_requests`` outcomes
    of which a share >= ``failure_rate`` failed.

Cool-down: trip number ``k`` in a streak keeps the breaker OPEN for
``min(max_cooldown_s, base_cooldown_s * 2**(k-1))``, so half-open probes come
at a growing but capped interval. ``trips`` is that streak. It is *not* reset
the moment a probe succeeds: an upstream that flaps (closes, then fails again
at once) would otherwise be retried at the base cool-down forever. Instead the
streak is forgotten once the breaker has stayed CLOSED for ``quiet_s``
seconds. A trip with an explicit ``until`` (the upstream's own Retry-After)
keeps the breaker open until then and does not lengthen the streak: the
upstream said when to come back, which is no sign of sickness. ``total_trips``
counts every trip, for metrics.

Probes: in HALF_OPEN, ``allows`` reserves one of ``half_open_probes`` slots
and answers ``True``; when the slots are full it answers ``False``. The
reservation is freed by the next ``record`` (the outcome is taken to be the
probe's) or by ``abandon_probe`` (client went away: no verdict). A slot that
hears nothing for ``probe_timeout_s`` is freed by itself so a lost probe can
never wedge the breaker.

Panic probes (the router's panic rule: a route never has every upstream
ejected): ``allows(panic=True)`` on an OPEN breaker reserves a probe slot
before the cool-down has passed, without changing state. A success closes the
breaker at once (requests are being served, so the breaker says so); a failure
only frees the slot: the cool-down and the streak stay as they were, since
panic probes come with the traffic and not on the breaker's schedule.

Late outcomes: a request admitted while CLOSED may finish after the breaker
opened. Its outcome is ignored while OPEN with no panic probe out, and while
HALF_OPEN with no probe out, so it can neither lengthen a cool-down nor close
the breaker. (With a probe out, the next outcome is taken to be the probe's.)

Every state change is returned as a ``BreakerTransition`` value from the call
that caused it (``allows``, ``record`` or ``trip``), for the caller to log and
count; calls that change no state return ``None`` (inside ``Admission`` for
``allows``). ``state(now=...)`` only looks: it reports HALF_OPEN once the
cool-down has passed, but the COOLED_DOWN transition is emitted by the next
``allows``. ``on_change``, when set, is called after every state change and
whenever an open breaker's ``open_until`` moves: apart from time passing
``open_until``, those are the only times what ``state(now=...)`` reports can change.
Time is always the ``now`` argument; nothing here reads a clock.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import final

from ._budget import BucketedCounts
from ._errors import RoutingStateError

__all__ = [
    "Admission",
    "BreakerState",
    "BreakerTransition",
    "CircuitBreaker",
    "Outcome",
]


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Outcome(enum.Enum):
    SUCCESS = "success"
    FAILURE = "failure"


class _Event(enum.Enum):
    TRIPPED = "tripped"
    FORCED = "forced"
    COOLED_DOWN = "cooled_down"
    PANIC_PROBE_OK = "panic_probe_ok"
    PROBE_OK = "probe_ok"
    PROBE_FAILED = "probe_failed"


_TRANSITIONS: dict[tuple[BreakerState, _Event], BreakerState] = {
    (BreakerState.CLOSED, _Event.TRIPPED): BreakerState.OPEN,
    (BreakerState.CLOSED, _Event.FORCED): BreakerState.OPEN,
    (BreakerState.OPEN, _Event.COOLED_DOWN): BreakerState.HALF_OPEN,
    (BreakerState.OPEN, _Event.PANIC_PROBE_OK): BreakerState.CLOSED,
    (BreakerState.HALF_OPEN, _Event.PROBE_OK): BreakerState.CLOSED,
    (BreakerState.HALF_OPEN, _Event.PROBE_FAILED): BreakerState.OPEN,
    (BreakerState.HALF_OPEN, _Event.FORCED): BreakerState.OPEN,
}

# Longer than any sane first-token deadline plus a full stream: a probe that
# has said nothing for this long was lost (cancelled, crashed task).
DEFAULT_PROBE_TIMEOUT_S = 120.0
# An upstream back after a short outage must be probed within seconds, and a
# long outage costs one probe per half minute per instance: cheap either way.
DEFAULT_MAX_COOLDOWN_S = 30.0

_SUCCESSES = 0
_FAILURES = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerTransition:
    """One state change of one breaker, for logs and metrics."""

    target: str
    old: BreakerState
    new: BreakerState
    reason: str
    at: float
    open_until: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Admission:
    """The answer of ``allows``: truthy when the request may go ahead.

    ``probe`` is true when the request holds a HALF_OPEN probe slot;
    ``transition`` is the state change ``allows`` made, if any.
    """

    allowed: bool
    probe: bool = False
    transition: BreakerTransition | None = None

    def __bool__(self) -> bool:
        return self.allowed


_DENIED = Admission(allowed=False)
_ADMITTED = Admission(allowed=True)
_PANIC_PROBE = Admission(allowed=True, probe=True)


def _check_args(
    consecutive_failures: int,
    failure_rate: float,
    min_requests: int,
    base_cooldown_s: float,
    max_cooldown_s: float,
    half_open_probes: int,
) -> None:
    problems = []
    if consecutive_failures < 1:
        problems.append(f"consecutive_failures must be >= 1, got {consecutive_failures}")
    if not 0.0 < failure_rate <= 1.0:
        problems.append(f"failure_rate must be in (0, 1], got {failure_rate}")
    if min_requests < 1:
        problems.append(f"min_requests must be >= 1, got {min_requests}")
    if not (math.isfinite(base_cooldown_s) and base_cooldown_s > 0):
        problems.append(f"base_cooldown_s must be a finite number > 0, got {base_cooldown_s}")
    if not (math.isfinite(max_cooldown_s) and max_cooldown_s >= base_cooldown_s):
        problems.append(f"max_cooldown_s must be >= base_cooldown_s, got {max_cooldown_s}")
    if half_open_probes < 1:
        problems.append(f"half_open_probes must be >= 1, got {half_open_probes}")
    if problems:
        raise ValueError("CircuitBreaker: " + "; ".join(problems))


@final
class CircuitBreaker:
    """Decides whether one upstream may be tried, from its recent outcomes."""

    __slots__ = (
        "_closed_at",
        "_consecutive",
        "_probes",
        "_state",
        "_window",
        "base_cooldown_s",
        "consecutive_failures",
        "failure_rate",
        "half_open_probes",
        "max_cooldown_s",
        "min_requests",
        "on_change",
        "open_until",
        "probe_timeout_s",
        "quiet_s",
        "target",
        "total_trips",
        "trips",
    )

    def __init__(
        self,
        target: str,
        *,
        consecutive_failures: int = 5,
        failure_rate: float = 0.5,
        min_requests: int = 10,
        window_s: float = 30.0,
        base_cooldown_s: float = 5.0,
        max_cooldown_s: float = DEFAULT_MAX_COOLDOWN_S,
        half_open_probes: int = 1,
        quiet_s: float = 60.0,
        probe_timeout_s: float = DEFAULT_PROBE_TIMEOUT_S,
    ) -> None:
        """Create a CLOSED breaker.

        Args:
            target: the upstream's name, copied into every transition.
            consecutive_failures: failures in a row that trip the breaker.
            failure_rate: share of failures in the window that trips it.
            min_requests: outcomes needed in the window before the rate counts.
            window_s: length of the sliding window in seconds.
            base_cooldown_s: OPEN time after the first trip of a streak.
            max_cooldown_s: longest OPEN time, however long the streak.
            half_open_probes: concurrent probes allowed in HALF_OPEN.
            quiet_s: CLOSED time after which the trip streak is forgotten.
            probe_timeout_s: age at which an unanswered probe slot is freed.

        Raises:
            ValueError: if any threshold is out of range.
        """
        _check_args(
            consecutive_failures,
            failure_rate,
            min_requests,
            base_cooldown_s,
            max_cooldown_s,
            half_open_probes,
        )
        self.target = target
        self.consecutive_failures = consecutive_failures
        self.failure_rate = failure_rate
        self.min_requests = min_requests
        self.base_cooldown_s = base_cooldown_s
        self.max_cooldown_s = max_cooldown_s
        self.half_open_probes = half_open_probes
        self.quiet_s = quiet_s
        self.probe_timeout_s = probe_timeout_s
        self.open_until: float | None = None
        #: Called after every state change and every move of ``open_until`` (the owner
        #: keeps a fleet-wide view of states current by it, see ``routing._fleet``).
        self.on_change: Callable[[], None] | None = None
        self.trips = 0
        self.total_trips = 0
        self._state = BreakerState.CLOSED
        self._window = BucketedCounts(window_s=window_s, fields=2)
        self._consecutive = 0
        self._probes: deque[float] = deque()  # reservation times, oldest first
        self._closed_at: float | None = None

    # -- the table -----------------------------------------------------------

    def _move(self, event: _Event, reason: str, now: float) -> BreakerTransition:
        try:
            new = _TRANSITIONS[self._state, event]
        except KeyError:
            raise RoutingStateError(
                f"breaker {self.target!r}: can't handle {event.name} in state {self._state.name}"
            ) from None
        old, self._state = self._state, new
        self._probes.clear()
        self._consecutive = 0
        self._window.clear()
        if new is BreakerState.CLOSED:
            self._closed_at = now
        if new is not BreakerState.OPEN:
            self.open_until = None
        if self.on_change is not None:
            self.on_change()
        return BreakerTransition(
            target=self.target,
            old=old,
            new=new,
            reason=reason,
            at=now,
            open_until=self.open_until,
        )

    def _cooldown(self) -> float:
        exponent = min(max(self.trips, 1) - 1, 62)  # 2**62 s dwarfs any max_cooldown_s
        return min(self.max_cooldown_s, self.base_cooldown_s * 2.0**exponent)

    def _open(
        self, event: _Event, reason: str, now: float, until: float | None
    ) -> BreakerTransition:
        self.total_trips += 1
        if until is None:
            self.trips += 1
            self.open_until = now + self._cooldown()
        else:  # the upstream said when: no sign of sickness, the streak stays
            self.open_until = max(until, now)
        return self._move(event, reason, now)

    def _reserve_probe(self, now: float) -> bool:
        while self._probes and now - self._probes[0] >= self.probe_timeout_s:
            self._probes.popleft()
        if len(self._probes) >= self.half_open_probes:
            return False
        self._probes.append(now)
        return True

    def _forget_old_trips(self, now: float) -> None:
        if (
            self._state is BreakerState.CLOSED
            and self._closed_at is not None
            and now - self._closed_at >= self.quiet_s
        ):
            self.trips = 0
            self._closed_at = None

    # -- public API ----------------------------------------------------------

    def state(self, *, now: float) -> BreakerState:
        """Return the state as seen at ``now``, changing nothing.

        Args:
            now: the current time in seconds.

        Returns:
            The current state, except that an OPEN breaker whose cool-down has
            passed is reported HALF_OPEN (the next ``allows`` makes it so).
        """
        if self._state is BreakerState.OPEN:
            assert self.open_until is not None
            if now >= self.open_until:
                return BreakerState.HALF_OPEN
        return self._state

    def allows(self, *, now: float, panic: bool = False) -> Admission:
        """Ask whether a request may be sent to this target now.

        In HALF_OPEN a ``True`` answer reserves a probe slot: the caller must
        later ``record`` the outcome or ``abandon_probe``.

        Args:
            now: the current time in seconds.
            panic: the route has no other upstream left (the router's panic
                rule): an OPEN breaker still in its cool-down admits a panic
                probe if a probe slot is free.

        Returns:
            An ``Admission``, truthy if the request may go. Its ``transition``
            is set when this call moved OPEN -> HALF_OPEN.
        """
        if self._state is BreakerState.CLOSED:
            if self._closed_at is not None:
                self._forget_old_trips(now)
            return _ADMITTED
        transition = None
        if self._state is BreakerState.OPEN:
            assert self.open_until is not None
            if now < self.open_until:
                return _PANIC_PROBE if panic and self._reserve_probe(now) else _DENIED
            reason = f"cool-down to {self.open_until:g} passed (trip {self.trips})"
            transition = self._move(_Event.COOLED_DOWN, reason, now)
        if not self._reserve_probe(now):
            return _DENIED
        return Admission(allowed=True, probe=True, transition=transition)

    def has_probe_out(self) -> bool:
        """Whether a probe (half-open or panic) holds a slot, waiting for its outcome."""
        return bool(self._probes)

    def record(self, outcome: Outcome, *, now: float) -> BreakerTransition | None:
        """Report how a request to this target ended.

        Args:
            outcome: ``Outcome.SUCCESS`` or ``Outcome.FAILURE``.
            now: the current time in seconds.

        Returns:
            The transition this outcome caused, or ``None``.

        Raises:
            RoutingStateError: if ``outcome`` is not an ``Outcome``; the
                breaker is unchanged.
        """
        if outcome is Outcome.SUCCESS and self._state is BreakerState.CLOSED:
            # The usual outcome, inline: _forget_old_trips, then _record_closed's success.
            closed_at = self._closed_at
            if closed_at is not None and now - closed_at >= self.quiet_s:
                self.trips = 0
                self._closed_at = None
            self._consecutive = 0
            self._window.add(_SUCCESSES, now=now)
            return None
        if not isinstance(outcome, Outcome):
            raise RoutingStateError(f"breaker {self.target!r}: record() needs an Outcome")
        self._forget_old_trips(now)
        if self._state is BreakerState.CLOSED:
            return self._record_closed(outcome, now)
        if not self._probes:
            return None  # a late outcome from before the trip: no verdict
        self._probes.popleft()
        if self._state is BreakerState.OPEN:  # a panic probe's outcome
            if outcome is Outcome.SUCCESS:
                return self._move(_Event.PANIC_PROBE_OK, "a panic probe succeeded", now)
            return None  # the cool-down and the streak stay as they were
        if outcome is Outcome.SUCCESS:
            return self._move(_Event.PROBE_OK, "probe succeeded", now)
        return self._open(_Event.PROBE_FAILED, "probe failed", now, None)

    def _record_closed(self, outcome: Outcome, now: float) -> BreakerTransition | None:
        if outcome is Outcome.SUCCESS:
            self._consecutive = 0
            self._window.add(_SUCCESSES, now=now)
            return None
        self._consecutive += 1
        self._window.add(_FAILURES, now=now)
        successes, failures = self._window.totals(now=now)
        total = successes + failures
        if self._consecutive >= self.consecutive_failures:
            reason = f"{self._consecutive} consecutive failures"
        elif total >= self.min_requests and failures / total >= self.failure_rate:
            reason = (
                f"failure rate {failures / total:.0%} >= {self.failure_rate:.0%}"
                f" over {total} requests in {self._window.window_s:g}s"
            )
        else:
            return None
        return self._open(_Event.TRIPPED, reason, now, None)

    def abandon_probe(self, *, now: float) -> None:
        """Free a probe slot whose request ended with no verdict (e.g. cancelled).

        Args:
            now: the current time in seconds.

        Raises:
            RoutingStateError: if no probe slot is reserved; nothing changes.
        """
        if self._state is BreakerState.CLOSED or not self._probes:
            raise RoutingStateError(
                f"breaker {self.target!r}: abandon_probe() called with no probe out"
            )
        self._probes.popleft()

    def trip(
        self, *, now: float, until: float | None = None, reason: str = "forced"
    ) -> BreakerTransition | None:
        """Force the breaker OPEN (Retry-After, a bad key or balance).

        Args:
            now: the current time in seconds.
            until: when the cool-down ends; ``None`` uses the growing
                cool-down. A time in the past means "now".
            reason: why, copied into the transition.

        Returns:
            The transition to OPEN, or ``None`` if it was already OPEN (then
            ``open_until`` is only ever pushed later, never earlier, the
            trip streak does not grow, and a panic probe's slot is freed).

        Raises:
            ValueError: if ``until`` is not a finite number.
        """
        if until is not None and not math.isfinite(until):
            raise ValueError(f"trip(): until must be a finite time, got {until!r}")
        self._forget_old_trips(now)
        if self._state is BreakerState.OPEN:
            assert self.open_until is not None
            new_until = now + self._cooldown() if until is None else until
            if new_until > self.open_until:
                self.open_until = new_until
                if self.on_change is not None:
                    self.on_change()
            if self._probes:  # a panic probe was told to wait: its slot is free again
                self._probes.popleft()
            return None
        return self._open(_Event.FORCED, reason, now, until)

    def __repr__(self) -> str:
        state = self._state
        if state is BreakerState.OPEN:
            detail = f"until={self.open_until:g} trips={self.trips}"
        elif state is BreakerState.HALF_OPEN:
            detail = f"probes={len(self._probes)}/{self.half_open_probes} trips={self.trips}"
        else:
            successes, failures = self._window.peek()
            detail = (
                f"failures={failures}/{successes + failures}"
                f" consecutive={self._consecutive} trips={self.trips}"
            )
        return f"<CircuitBreaker target={self.target} {state.name} {detail}>"
