"""Which pin of a session wins when instances pin it concurrently (pure, no I/O, no clock).

Rules / theory of operation
---------------------------
A session's pin (the upstream holding its prompt cache) must not flip because a
follow-up reached another instance before the first pin did. So pins are not
last-writer-wins; each carries a ``PinStamp`` and the order is:

1. the higher ``gen`` (generation) wins: a *move* is a pin written by an instance
   that saw the session pinned and chose another upstream (the pinned one was
   unhealthy or slow), and it carries the generation it saw plus one;
2. within one generation the *earliest* pin wins, by hybrid logical clock
   (``HlcStamp``: wall milliseconds, then a counter), ties broken by writer id.

So two instances that pin a new session at the same time converge on the first
pin everywhere, whichever update arrives last, and a move replaces a pin only when
it was made knowing that pin. Two concurrent moves from the same generation are
again settled by the earliest.

Hybrid logical clock: ``HybridClock.now(physical_s)`` never goes backwards and
moves past every stamp it has ``observe``d, so a pin made after seeing another is
stamped after it even if this machine's clock is behind (within the skew the wall
part allows, a stamp still reads as a time).

Wire format (inside the session's JSON value, readable by any Yjs client):
``"pin": {"gen": 0, "at": [wall_ms, counter], "by": writer}``. A value without it
(older instances, foreign clients) counts as generation 0 stamped at its ``ts``.

``merged(old, new)`` is what a replica does when a remote change replaced its
session value: the pin by the rule above, everything else (last_seen, attributes)
from the later write by ``(ts, by)``. Both orders are total, so every replica that
repairs ends with the same value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, final


@final
@dataclass(frozen=True, slots=True, order=True)
class HlcStamp:
    """A hybrid logical clock reading: wall milliseconds, then a counter."""

    wall_ms: int
    counter: int = 0


@final
class HybridClock:
    """One writer's hybrid logical clock; physical time is always an argument."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last = HlcStamp(0, 0)

    def __repr__(self) -> str:
        return f"<HybridClock {self.last.wall_ms}.{self.last.counter}>"

    def now(self, physical_s: float) -> HlcStamp:
        """A stamp for an event at ``physical_s``, later than every stamp seen so far."""
        wall = int(physical_s * 1000)
        if wall > self.last.wall_ms:
            self.last = HlcStamp(wall, 0)
        else:
            self.last = HlcStamp(self.last.wall_ms, self.last.counter + 1)
        return self.last

    def observe(self, stamp: HlcStamp) -> None:
        """Move past a stamp received from another writer."""
        if stamp > self.last:
            self.last = stamp


@final
@dataclass(frozen=True, slots=True)
class PinStamp:
    """What orders one pin against another (see the module rules)."""

    gen: int
    at: HlcStamp
    by: str

    def beats(self, other: PinStamp | None) -> bool:
        """True if this pin wins over ``other`` (any pin beats no pin)."""
        if other is None:
            return True
        return (-self.gen, self.at, self.by) < (-other.gen, other.at, other.by)

    def to_wire(self) -> dict[str, Any]:
        """The ``pin`` entry of a session value."""
        return {"gen": self.gen, "at": [self.at.wall_ms, self.at.counter], "by": self.by}

    @classmethod
    def of(cls, value: Any) -> PinStamp | None:
        """The stamp of a session value; None if it pins no upstream or is malformed."""
        if not isinstance(value, dict) or value.get("upstream") is None:
            return None
        pin = value.get("pin")
        try:
            if isinstance(pin, dict):
                wall, counter = pin["at"]
                return cls(int(pin["gen"]), HlcStamp(int(wall), int(counter)), str(pin["by"]))
            ts = value.get("ts")
            if isinstance(ts, int | float):
                return cls(0, HlcStamp(int(ts * 1000), 0), str(value.get("by", "")))
        except (KeyError, TypeError, ValueError):
            pass
        return None


def next_pin(
    current: Any, *, moved_from: str | None, expired: bool, at: HlcStamp, by: str
) -> PinStamp | None:
    """The stamp for a new pin over the stored value ``current``; None if ``current`` keeps it.

    Args:
        current: the session value stored now (None if absent).
        moved_from: the upstream the caller saw the session pinned to when it chose
            another, or None if it saw no pin.
        expired: ``current`` is past its TTL: a new pin replaces it outright.
        at: this write's hybrid-clock stamp.
        by: this writer's id.
    """
    stored = PinStamp.of(current)
    if stored is None:
        return PinStamp(0, at, by)
    if expired or (moved_from is not None and current.get("upstream") == moved_from):
        return PinStamp(stored.gen + 1, at, by)  # an explicit move from what we saw
    # Pinned by someone else since the caller looked (or it never saw that pin): a
    # concurrent pin of the same generation, which the earliest wins.
    candidate = PinStamp(stored.gen, at, by)
    return candidate if candidate.beats(stored) else None


def merged(old: Any, new: Any) -> dict[str, Any] | None:
    """The value a session should hold after ``new`` replaced ``old``; None if ``new`` is it.

    Values without a numeric ``ts`` (a foreign client's write) are accepted as they are.
    """
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return None
    old_ts, new_ts = old.get("ts"), new.get("ts")
    if not (isinstance(old_ts, int | float) and isinstance(new_ts, int | float)):
        return None
    later = old if (old_ts, str(old.get("by", ""))) > (new_ts, str(new.get("by", ""))) else new
    old_pin, new_pin = PinStamp.of(old), PinStamp.of(new)
    pinned = old if old_pin is not None and old_pin.beats(new_pin) else new
    result = dict(later)
    for key in ("upstream", "pin"):
        if key in pinned:
            result[key] = pinned[key]
        else:
            result.pop(key, None)
    return None if result == new else result


__all__ = ["HlcStamp", "HybridClock", "PinStamp", "merged", "next_pin"]
