"""Test doubles shared by the test modules.

Only our own collaborators that stand for the outside world live here (a clock);
our own code is never faked.
"""

from __future__ import annotations

import math
from typing import final


@final
class FakeClock:
    """A clock that moves only when a test says so.

    ``now()`` has the shape of ``time.monotonic`` so it can be injected where a
    ``Clock`` is expected; ``advance(s)`` moves it forward.
    """

    __slots__ = ("_now",)

    def __init__(self, start: float = 100.0) -> None:
        self._now = start

    def now(self) -> float:
        """Return the current fake time in seconds."""
        return self._now

    def advance(self, seconds: float) -> float:
        """Move time forward by ``seconds`` (>= 0) and return the new time.

        Raises:
            ValueError: if ``seconds`` is negative or not finite; a monotonic
                clock never goes back.
        """
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"FakeClock.advance(): seconds must be >= 0, got {seconds!r}")
        self._now += seconds
        return self._now

    def __repr__(self) -> str:
        return f"<FakeClock now={self._now:g}>"
