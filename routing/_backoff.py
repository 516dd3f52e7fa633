"""Delays between tries as one pure generator (jittered exponential backoff).

Rules / Theory of operation
---------------------------
When many clients retry against the same server, plain exponential backoff
keeps them in lock-step: they all come back at 1 s, 2 s, 4 s... and hit it
together each time. AWS's "Exponential Backoff and Jitter" study shows that
drawing each delay at random from the interval spreads them out:

    ceiling(n) = min(cap_s, base_s * 2**n)                    n = 0, 1, 2, ...
    FULL:   delay(n) = uniform(0, ceiling(n))
    EQUAL:  delay(n) = uniform(ceiling(n) / 2, ceiling(n))

* ``Jitter.FULL`` spreads clients best for the least total work; the proxy
  uses it between attempts of one request (``retry.backoff_base``/``_cap``).
* ``Jitter.EQUAL`` never waits less than half the ceiling; statesync uses it to
  redial a peer, where a near-zero delay after a refused connection would only
  be refused again.
* This is the only backoff in skyroute: the generator is infinite and pure. It
  never sleeps and never reads a clock; the caller takes as many delays as it
  allows tries and sleeps through an injected ``sleep``, so tests run a whole
  retry policy in zero wall time.
* All randomness comes from the ``rng`` argument; a seeded ``random.Random``
  makes a sequence reproducible.
* Arguments are checked when the function is called, not at the first
  ``next()``, so a bad config fails where it is built.
* Once ``base_s * 2**n`` reaches ``cap_s`` the ceiling stops growing, so no
  float overflow happens however long the generator runs.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Awaitable, Callable, Iterator

__all__ = ["Jitter", "Sleep", "backoff_delays"]

Sleep = Callable[[float], Awaitable[None]]
"""What the shells wait through (``asyncio.sleep`` in production); injected so a test
can take the delays without waiting them."""


class Jitter(enum.Enum):
    """How a delay is drawn below its ceiling (see the module docstring)."""

    FULL = "full"
    EQUAL = "equal"


def backoff_delays(*, base_s: float, cap_s: float, rng: random.Random,
                   jitter: Jitter = Jitter.FULL) -> Iterator[float]:
    """Return an infinite iterator of jittered exponential backoff delays in seconds.

    Attempt ``n`` (from 0) draws below the ceiling ``min(cap_s, base_s * 2**n)``:
    from all of it with ``Jitter.FULL``, from its upper half with ``Jitter.EQUAL``.

    Args:
        base_s: ceiling of the first delay, in seconds (> 0).
        cap_s: largest ceiling any delay may have, in seconds (>= base_s).
        rng: the source of randomness; pass a seeded ``random.Random`` to
            make the sequence reproducible.
        jitter: how a delay is drawn below its ceiling.

    Returns:
        An iterator that never ends; take as many delays as attempts allowed.

    Raises:
        ValueError: if ``base_s`` is not a finite number > 0, or ``cap_s`` is
            not finite or smaller than ``base_s``.
    """
    if not (math.isfinite(base_s) and base_s > 0):
        raise ValueError(f"backoff_delays: base_s must be a finite number > 0, got {base_s!r}")
    if not (math.isfinite(cap_s) and cap_s >= base_s):
        raise ValueError(
            f"backoff_delays: cap_s must be a finite number >= base_s ({base_s!r}),"
            f" got {cap_s!r}"
        )
    return _delays(base_s, cap_s, rng, 0.0 if jitter is Jitter.FULL else 0.5)


def _delays(base_s: float, cap_s: float, rng: random.Random, floor: float) -> Iterator[float]:
    ceiling = base_s
    while True:
        top = min(cap_s, ceiling)
        yield rng.uniform(top * floor, top)
        if ceiling < cap_s:
            ceiling *= 2.0
