"""Client rate limits (a key's ``rpm`` and ``tpm``): admit a request, or refuse it and say when.

Rules / Theory of operation
---------------------------
* Usage comes in as counted slices of time (statesync's usage buckets, summed over
  every instance): requests and tokens counted in ``[start, end)``. A slice
  counts towards the limits until ``RATE_WINDOW_S`` after its ``end``; that is
  the sliding window (60 s, exact to the slice length: at most a second more).
* A request is admitted while fewer than ``rpm`` requests and fewer than ``tpm``
  tokens are counted now. Tokens are known only once an answer is complete, so
  one answer may take a key past ``tpm``; the next request is then refused.
* A refusal says when the same request would be admitted: for each limit that
  is reached, the oldest slices leave the window one by one until the count is
  under the limit, and the end of the last one to leave is when. With both
  limits reached, the later of the two. ``retry_after_s`` is that wait in whole
  seconds, rounded up, and the message says the same number, so a client that
  waits as told (the OpenAI SDK honours ``Retry-After``) is admitted, unless
  other requests of the key fill the window meanwhile.
* Nothing here reads a clock or the store: the shell passes the slices and
  ``now`` (the store's wall clock) and counts an admitted request itself.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

#: ``rpm`` and ``tpm`` are per minute.
RATE_WINDOW_S: Final = 60.0


class UsageSlice(Protocol):
    """Usage of one key counted in ``[start, end)`` (statesync's ``UsageBucket``)."""

    @property
    def end(self) -> float: ...
    @property
    def requests(self) -> int: ...
    @property
    def tokens(self) -> int: ...


class Limit(enum.StrEnum):
    """Which limit refused a request (string-valued, as the OpenAI rate-limit headers say)."""

    REQUESTS = "requests"
    TOKENS = "tokens"


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitStatus:
    """Where one limit stands once an admitted request is counted (OpenAI's
    ``x-ratelimit-{limit,remaining,reset}-*`` headers say this to the client)."""

    limit: Limit
    allowed: int
    remaining: int
    reset_s: float  # until the oldest counted slice leaves the window (0: nothing counted)


@dataclass(frozen=True, slots=True, kw_only=True)
class Admit:
    """Serve the request (and count it); ``status`` has one entry per limit the key has."""

    status: tuple[LimitStatus, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimited:
    """Refuse the request with 429: ``limit`` is reached until ``retry_after_s`` from now."""

    limit: Limit
    allowed: int  # the key's rpm or tpm
    used: int  # what is counted in the window now (at least ``allowed``)
    retry_after_s: int  # whole seconds, at least 1: the Retry-After header
    message: str

    @property
    def remaining(self) -> int:
        """What is left of the limit now (always 0 for a refusal)."""
        return max(0, self.allowed - self.used)


def check_rate(*, key: str, rpm: int | None, tpm: int | None, usage: Sequence[UsageSlice],
               now: float) -> Admit | RateLimited:
    """Whether a request of client key ``key`` may be served now.

    Args:
        key: the client key's name (for the message).
        rpm: requests per minute the key may send (None: no limit).
        tpm: tokens per minute the key may use (None: no limit).
        usage: the key's counted slices across every instance, in any order.
        now: the clock of the slices' ``end`` (wall-clock seconds).

    Returns:
        ``Admit``, or ``RateLimited`` saying which limit, until when, in one message.
    """
    live = sorted((s for s in usage if s.end + RATE_WINDOW_S > now), key=lambda s: s.end)
    refusals, status = [], []
    for limit, allowed in ((Limit.REQUESTS, rpm), (Limit.TOKENS, tpm)):
        if allowed is None:
            continue
        counts = [(s.end + RATE_WINDOW_S,
                   s.requests if limit is Limit.REQUESTS else s.tokens) for s in live]
        used = sum(n for _, n in counts)
        if used >= allowed:
            refusals.append((_admitted_at(counts, used, allowed, now), limit, allowed, used))
        this = 1 if limit is Limit.REQUESTS else 0  # the request being admitted counts too
        reset = max(0.0, counts[0][0] - now) if counts else 0.0
        status.append(LimitStatus(limit=limit, allowed=allowed,
                                  remaining=max(0, allowed - used - this), reset_s=reset))
    if not refusals:
        return Admit(status=tuple(status))
    at, limit, allowed, used = max(refusals)
    wait = max(1, math.ceil(at - now))
    what = "rate limit" if limit is Limit.REQUESTS else "token limit"
    return RateLimited(limit=limit, allowed=allowed, used=used, retry_after_s=wait, message=(
        f"{what} for key '{key}': {allowed} {limit} per minute across all skyroute "
        f"instances, and {used} were counted in the last minute; retry after {wait}s"))


def _admitted_at(counts: list[tuple[float, int]], used: int, allowed: int, now: float) -> float:
    """When enough of the oldest counts (``(leaves_at, n)``, oldest first) have left."""
    for leaves_at, n in counts:
        used -= n
        if used < allowed:
            return leaves_at
    return now  # only negative corrections were left: nothing to wait for
