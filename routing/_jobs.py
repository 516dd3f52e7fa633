"""Decisions for durable jobs: what to do after a try, how wide the lane is, batch lines.

Rules / Theory of operation
---------------------------
A *job* is one request skyroute runs on a client's behalf later: an async single
request (``POST /v1/async/...``) or one line of a batch. ``proxy/`` runs each try
through skyroute's own request path and feeds the answer here.

* **After a try** (``after_try``): a 2xx answer is ``Finished``. A 4xx other than
  408/409/429 is the request's own fault: ``Finished`` too (it goes to the error
  file as is, never retried). Anything else (5xx, 408, 409, 429, no answer at all)
  is ``RetryLater`` while tries remain (``max_retries`` retries after the first
  try), waiting a full-jitter exponential delay (``_backoff``: ``base * 2**n`` capped)
  or the upstream's ``Retry-After`` if that is longer; then ``GaveUp`` with the last
  error.
* **The lane** (``LaneWindow``): jobs are low priority. Their concurrency follows
  AIMD as TCP's congestion window does: every busy signal (429/503/504, no answer,
  the route at ``reduced`` or worse) halves it, at most once per ``cooldown_s`` so
  one burst counts once; every finished try adds ``1/window``, i.e. about one slot
  per window's worth of successes. It never goes below 1 or above the configured
  ``jobs.concurrency``.
* **Job targets** (``job_target_order``): ``jobs.targets`` names, per model alias,
  upstreams a job tries first (a cheaper or local pool). Those available now go first,
  in the order written; then the route's own order (what an interactive request
  gets); preferred ones not available come last, for the panic rule only. So a job
  reaches the route's targets when every preferred upstream is out, or when the
  preferred ones it tried failed (failover, as for any request).
* **Sharing the instance with clients** (``LaneShare``): while clients are being served
  (a client request started or in flight in one of the last ``quiet_ticks`` ticks), the
  lane may start jobs only up to a *share* of its window, set each tick by AIMD on the
  instance's own load: the process's CPU use over the tick above ``cpu_target`` (of one
  core) or the event loop's lag above ``lag_limit_s`` halves the share (down to 0: no
  new job starts), otherwise it grows by one. The first tick with clients starts from
  0, not from the whole window, so a lane running flat out stops taking more the moment
  clients arrive. After ``quiet_ticks`` ticks without clients the lane has its whole
  window (spare capacity is all of it); a client now and then (one polling a batch)
  does not flip it back to 0 each time. A share of 0 still starts one job per
  ``trickle_s`` when none is running, so a saturated instance slows the lane to a
  trickle but never stops it.
* **Batch lines** (``read_batch_line``): one JSONL line is a JSON object with a
  non-empty string ``custom_id``, ``method`` POST, ``url`` equal to the batch's
  endpoint and an object ``body`` without ``stream: true`` (a batch answer is
  whole). A line that breaks a rule is a ``LineProblem`` for the error file; the
  other lines still run.
* **Batch status** moves by ``BATCH_TRANSITIONS`` only; ``next_batch_status``
  raises ``RoutingStateError`` for any other move.
"""

from __future__ import annotations

import enum
import json
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, final

from ._backoff import backoff_delays
from ._errors import RoutingStateError

__all__ = [
    "BATCH_ENDPOINTS",
    "BATCH_TRANSITIONS",
    "BUSY_STATUSES",
    "BatchLine",
    "BatchStatus",
    "Finished",
    "GaveUp",
    "LaneShare",
    "LaneWindow",
    "LineProblem",
    "RetryLater",
    "after_try",
    "job_target_order",
    "next_batch_status",
    "read_batch_line",
    "retry_delay",
]

#: Answers that say "not now" rather than "never": retried, and they slow the lane.
BUSY_STATUSES: Final = frozenset({408, 409, 429, 500, 502, 503, 504})
#: The endpoints OpenAI's Batch API accepts.
BATCH_ENDPOINTS: Final = ("/v1/chat/completions", "/v1/embeddings", "/v1/completions",
                          "/v1/responses", "/v1/moderations")


@dataclass(frozen=True, slots=True, kw_only=True)
class Finished:
    """The job is done with this answer (2xx, or a 4xx that no retry would change)."""

    status: int


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryLater:
    """Run the job again after ``delay_s``."""

    delay_s: float
    error: str


@dataclass(frozen=True, slots=True, kw_only=True)
class GaveUp:
    """No retries left: the job ends with ``error`` (and the last answer, if any)."""

    error: str


def retry_delay(retries_done: int, *, base_s: float, cap_s: float, rng: random.Random,
                retry_after_s: float | None = None) -> float:
    """The wait before retry ``retries_done + 1``: full jitter, at least ``Retry-After``."""
    delays: Iterator[float] = backoff_delays(base_s=base_s, cap_s=cap_s, rng=rng)
    delay = 0.0
    for _ in range(retries_done + 1):
        delay = next(delays)
    return max(delay, retry_after_s or 0.0)


def after_try(status: int | None, *, error: str, retries_done: int, max_retries: int,
              base_s: float, cap_s: float, rng: random.Random,
              retry_after_s: float | None = None) -> Finished | RetryLater | GaveUp:
    """What to do after one try of a job.

    Args:
        status: the answer's HTTP status; None when no answer came (connection).
        error: what went wrong, in words (kept as the job's last error).
        retries_done: retries already made (0 after the first try).
        retry_after_s: the answer's Retry-After, in seconds.
    """
    if status is not None and status not in BUSY_STATUSES:
        return Finished(status=status)
    if retries_done >= max_retries:
        return GaveUp(error=f"{error} (after {retries_done + 1} tries; jobs.max_retries is "
                            f"{max_retries})")
    return RetryLater(delay_s=retry_delay(retries_done, base_s=base_s, cap_s=cap_s, rng=rng,
                                          retry_after_s=retry_after_s), error=error)


@final
class LaneWindow:
    """The low-priority lane's concurrency, by AIMD (see the module docstring)."""

    __slots__ = ("_cooldown_s", "_decreased_at", "_window", "limit")

    def __init__(self, limit: int, *, cooldown_s: float = 1.0) -> None:
        if limit < 1:
            raise ValueError(f"LaneWindow: limit must be >= 1, got {limit!r}")
        self.limit = limit
        self._window = float(limit)
        self._cooldown_s = cooldown_s
        self._decreased_at: float | None = None

    def __repr__(self) -> str:
        return f"<LaneWindow {self.size}/{self.limit}>"

    @property
    def size(self) -> int:
        """Jobs that may run at once now."""
        return max(1, int(self._window))

    def set_limit(self, limit: int) -> None:
        """A reload changed ``jobs.concurrency``."""
        self.limit = max(1, limit)
        self._window = min(self._window, float(self.limit))

    def on_busy(self, *, now: float) -> bool:
        """An upstream was busy or the route degraded: halve (once per cooldown).

        Returns:
            True if the window shrank.
        """
        if self._decreased_at is not None and now - self._decreased_at < self._cooldown_s:
            return False
        self._decreased_at = now
        self._window = max(1.0, self._window / 2)
        return True

    def on_success(self) -> None:
        """A try finished without a busy signal: grow by about one per window."""
        self._window = min(float(self.limit), self._window + 1.0 / self._window)


def job_target_order(preferred: Sequence[str], order: Sequence[str], *,
                     available: Callable[[str], bool]) -> list[str]:
    """A job's target order: ``preferred`` (``jobs.targets``) available now, in the order
    written, then the route's ``order``, then the preferred ones out of service."""
    first = [name for name in preferred if available(name)]
    rest = [name for name in order if name not in first]
    return first + rest + [name for name in preferred if name not in first and name not in rest]


@final
class LaneShare:
    """How many lane jobs may run while clients are served (see the module docstring)."""

    __slots__ = ("_last_trickle", "_quiet", "cpu_target", "lag_limit_s", "quiet_ticks",
                 "share", "trickle_s")

    def __init__(self, *, cpu_target: float = 0.5, lag_limit_s: float = 0.005,
                 trickle_s: float = 1.0, quiet_ticks: int = 5) -> None:
        if not 0 < cpu_target <= 1:
            raise ValueError(f"LaneShare: cpu_target must be in (0, 1], got {cpu_target!r}")
        self.cpu_target = cpu_target
        self.lag_limit_s = lag_limit_s
        self.trickle_s = trickle_s
        self.quiet_ticks = quiet_ticks
        #: Jobs the lane may run now; None while no client is served (the whole window).
        self.share: int | None = None
        self._last_trickle: float | None = None
        self._quiet = 0  # ticks without clients in a row

    def __repr__(self) -> str:
        return f"<LaneShare {'all' if self.share is None else self.share}>"

    def tick(self, *, clients: int, cpu: float, lag_s: float, window: int) -> None:
        """One tick's observation.

        Args:
            clients: client requests started during the tick or in flight at its end.
            cpu: the process's CPU time over the tick's wall time (1.0: one core).
            lag_s: how late the event loop ran a timer (its queue of ready work).
            window: the lane's AIMD window now (``LaneWindow.size``).
        """
        self._quiet = self._quiet + 1 if clients == 0 else 0
        if self.share is None and clients == 0:
            return
        if self._quiet >= self.quiet_ticks:
            self.share = None
            return
        if self.share is None:
            self.share = 0
        elif cpu > self.cpu_target or lag_s > self.lag_limit_s:
            self.share //= 2
        else:
            self.share += 1
        self.share = min(self.share, window)

    def room(self, *, window: int, running: int, now: float) -> int:
        """Jobs the lane may start now."""
        if self.share is None:
            return window - running
        if self.share == 0 and running == 0 and (
                self._last_trickle is None or now - self._last_trickle >= self.trickle_s):
            self._last_trickle = now
            return 1
        return min(window, self.share) - running


class BatchStatus(enum.StrEnum):
    """A batch's status, as OpenAI names them."""

    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in (BatchStatus.FAILED, BatchStatus.COMPLETED, BatchStatus.EXPIRED,
                        BatchStatus.CANCELLED)


_S = BatchStatus
#: Every move a batch may make.
BATCH_TRANSITIONS: Final = frozenset({
    (_S.VALIDATING, _S.IN_PROGRESS), (_S.VALIDATING, _S.FAILED),
    (_S.VALIDATING, _S.CANCELLING),
    (_S.IN_PROGRESS, _S.FINALIZING), (_S.IN_PROGRESS, _S.CANCELLING),
    (_S.IN_PROGRESS, _S.EXPIRED),
    (_S.FINALIZING, _S.COMPLETED), (_S.FINALIZING, _S.FAILED),
    (_S.CANCELLING, _S.CANCELLED),
})


def next_batch_status(current: BatchStatus, new: BatchStatus) -> BatchStatus:
    """``new``, if a batch may move there from ``current``.

    Raises:
        RoutingStateError: the move is not in ``BATCH_TRANSITIONS``; nothing changes.
    """
    if (current, new) not in BATCH_TRANSITIONS:
        raise RoutingStateError(f"next_batch_status(): a batch cannot go from {current} "
                                f"to {new}") from None
    return new


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchLine:
    """One valid request line of a batch input file."""

    line: int  # 1-based
    custom_id: str
    body: bytes  # the request body as JSON


@dataclass(frozen=True, slots=True, kw_only=True)
class LineProblem:
    """A line of a batch input file that cannot run (it goes to the error file)."""

    line: int
    custom_id: str | None
    code: str
    message: str


def read_batch_line(raw: bytes, *, line: int, endpoint: str) -> BatchLine | LineProblem:
    """Check one JSONL line of a batch input file against OpenAI's rules (module docstring)."""
    try:
        item: Any = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        return LineProblem(line=line, custom_id=None, code="invalid_json_line",
                           message=f"line {line} is not valid JSON: {exc}")
    if not isinstance(item, dict):
        return LineProblem(line=line, custom_id=None, code="invalid_json_line",
                           message=f"line {line} must be a JSON object")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return LineProblem(line=line, custom_id=None, code="missing_required_parameter",
                           message=f"line {line}: 'custom_id' must be a non-empty string")

    def problem(code: str, message: str) -> LineProblem:
        return LineProblem(line=line, custom_id=custom_id, code=code,
                           message=f"line {line} (custom_id {custom_id!r}): {message}")

    if item.get("method") != "POST":
        return problem("invalid_request", "'method' must be \"POST\"")
    if item.get("url") != endpoint:
        return problem("mismatched_endpoint", f"'url' is {item.get('url')!r} but the batch's "
                                              f"endpoint is {endpoint!r}")
    body = item.get("body")
    if not isinstance(body, dict):
        return problem("invalid_request", "'body' must be a JSON object")
    if body.get("stream") is True:
        return problem("invalid_request", "'body.stream' must not be true: a batch answer is "
                                          "returned whole")
    return BatchLine(line=line, custom_id=custom_id,
                     body=json.dumps(body, separators=(",", ":")).encode())
