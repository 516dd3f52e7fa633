"""Retry delays as a pure generator ("full jitter" exponential backoff).

Rules / Theory of operation
---------------------------
When many clients retry against the same upstream, plain exponential backoff
keeps them in lock-step: they all come back at 1 s, 2 s, 4 s... and hit the
upstream together each time. AWS's "Exponential Backoff and Jitter" study shows
that drawing each delay uniformly from the whole interval ("full jitter")
spreads them out best, for the least total work:

    delay(n) = uniform(0, min(cap_s, base_s * 2**n))      n = 0, 1, 2, ...

* The generator is infinite and pure: it never sleeps and never reads a clock.
  The retry policy decides how many delays to take (``itertools.islice``) and
  the proxy sleeps through an injected ``sleep``, so tests run in zero time.
* All randomness comes from the ``rng`` argument; a seeded ``random.Random``
  makes a sequence reproducible.
* Arguments are checked when the function is called, not at the first
  ``next()``, so a bad config fails where it is built.
* Once ``base_s * 2**n`` reaches ``cap_s`` the ceiling stops growing, so no
  float overflow happens however long the generator runs.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator

__all__ = ["full_jitter_delays"]


def full_jitter_delays(*, base_s: float, cap_s: float, rng: random.Random) -> Iterator[float]:
    """Return an infinite iterator of full-jitter backoff delays in seconds.

    Attempt ``n`` (from 0) yields ``rng.uniform(0, min(cap_s, base_s * 2**n))``.

    Args:
        base_s: ceiling of the first delay, in seconds (> 0).
        cap_s: largest ceiling any delay may have, in seconds (>= base_s).
        rng: the source of randomness; pass a seeded ``random.Random`` to
            make the sequence reproducible.

    Returns:
        An iterator that never ends; take as many delays as attempts allowed.

    Raises:
        ValueError: if ``base_s`` is not a finite number > 0, or ``cap_s`` is
            not finite or smaller than ``base_s``.
    """
    if not (math.isfinite(base_s) and base_s > 0):
        raise ValueError(f"full_jitter_delays: base_s must be a finite number > 0, got {base_s!r}")
    if not (math.isfinite(cap_s) and cap_s >= base_s):
        raise ValueError(
            f"full_jitter_delays: cap_s must be a finite number >= base_s ({base_s!r}),"
            f" got {cap_s!r}"
        )
    return _delays(base_s, cap_s, rng)


def _delays(base_s: float, cap_s: float, rng: random.Random) -> Iterator[float]:
    ceiling = base_s
    while True:
        yield rng.uniform(0.0, min(cap_s, ceiling))
        if ceiling < cap_s:
            ceiling *= 2.0
