"""The pin rule (``_pins``): earliest pin by hybrid logical clock, moves by generation."""

from __future__ import annotations

from typing import Any

import pytest
from skyroute.statesync._pins import HlcStamp, HybridClock, PinStamp, merged, next_pin


def value(upstream: str | None, *, gen: int, at: tuple[int, int], by: str, ts: float,
          last_seen: float | None = None) -> dict[str, Any]:
    return {"upstream": upstream, "created": 0.0, "last_seen": last_seen or ts, "attributes": {},
            "ts": ts, "by": by, "pin": {"gen": gen, "at": list(at), "by": by}}


def test_HybridClock_never_goes_back_and_moves_past_what_it_saw() -> None:
    """Same millisecond: the counter grows; a stamp from ahead is passed; wall time takes over."""
    clock = HybridClock()
    assert clock.now(1.0) == HlcStamp(1000, 0)
    assert clock.now(1.0) == HlcStamp(1000, 1)
    assert clock.now(0.5) == HlcStamp(1000, 2)  # the wall clock stepped back
    clock.observe(HlcStamp(5000, 7))
    assert clock.now(2.0) == HlcStamp(5000, 8)  # after a peer's pin, even with a slow clock
    assert clock.now(6.0) == HlcStamp(6000, 0)


PIN_ORDER = [
    # (a, b, a beats b)
    (PinStamp(0, HlcStamp(100), "a"), PinStamp(0, HlcStamp(105), "b"), True),  # earliest
    (PinStamp(0, HlcStamp(100, 1), "a"), PinStamp(0, HlcStamp(100, 0), "b"), False),
    (PinStamp(0, HlcStamp(100), "a"), PinStamp(0, HlcStamp(100), "b"), True),  # tie: writer
    (PinStamp(1, HlcStamp(900), "b"), PinStamp(0, HlcStamp(100), "a"), True),  # a move
    (PinStamp(0, HlcStamp(100), "a"), None, True),
]


@pytest.mark.parametrize(("first", "second", "wins"), PIN_ORDER)
def test_PinStamp_order(first: PinStamp, second: PinStamp | None, wins: bool) -> None:
    """Higher generation wins; within one, the earlier stamp, then the smaller writer id."""
    assert first.beats(second) is wins
    if second is not None:
        assert second.beats(first) is not wins  # a total order: exactly one wins


def test_PinStamp_of_reads_legacy_values_as_generation_zero_at_their_ts() -> None:
    """A value from an older instance (no ``pin``) is stamped by its ts; no upstream, no pin."""
    legacy = {"upstream": "u", "ts": 12.5, "by": "old.1"}
    assert PinStamp.of(legacy) == PinStamp(0, HlcStamp(12500), "old.1")
    assert PinStamp.of({"upstream": None, "ts": 1.0}) is None
    assert PinStamp.of({"upstream": "u", "pin": {"gen": "x"}}) is None
    assert PinStamp.of("junk") is None


NEXT_PIN = [
    # (stored upstream/gen, moved_from, expired, expected generation or None = keep stored)
    (None, None, False, 0),  # a new session
    (("up-a", 0), None, False, None),  # pinned meanwhile by an earlier pin: it stays
    (("up-a", 0), "up-a", False, 1),  # a move from the pin the caller saw
    (("up-a", 2), "up-x", False, None),  # moved meanwhile from what the caller saw: stays
    (("up-a", 0), None, True, 1),  # expired: replaced outright
]


@pytest.mark.parametrize(("stored", "moved_from", "expired", "gen"), NEXT_PIN)
def test_next_pin(stored: tuple[str, int] | None, moved_from: str | None, expired: bool,
                  gen: int | None) -> None:
    """A pin replaces the stored one only as a move from it (or when it expired)."""
    current = value(stored[0], gen=stored[1], at=(100, 0), by="a", ts=0.1) if stored else None
    got = next_pin(current, moved_from=moved_from, expired=expired, at=HlcStamp(200), by="b")
    assert (got.gen if got is not None else None) == gen


def test_merged_keeps_the_earlier_pin_and_the_later_activity() -> None:
    """A later first pin replaced ours: the merge keeps our pin and the later last_seen."""
    ours = value("up-a", gen=0, at=(100, 0), by="a", ts=0.1)
    theirs = value("up-b", gen=0, at=(150, 0), by="b", ts=0.15)
    fixed = merged(ours, theirs)
    assert fixed is not None
    assert fixed["upstream"] == "up-a" and fixed["pin"] == ours["pin"]
    assert fixed["last_seen"] == 0.15 and fixed["by"] == "b"
    assert merged(theirs, fixed) is None  # the other replica accepts the merge as it is
    assert merged(theirs, ours) == {**ours, "last_seen": 0.15, "ts": 0.15, "by": "b"}


def test_merged_accepts_a_move_and_foreign_writes() -> None:
    """A move replaces an older generation; a value without ts is accepted as it is."""
    ours = value("up-a", gen=0, at=(100, 0), by="a", ts=0.1)
    move = value("up-b", gen=1, at=(90, 0), by="b", ts=0.09)  # even with a slower clock
    fixed = merged(ours, move)
    assert fixed is not None and fixed["upstream"] == "up-b"  # pin from the move, ts from ours
    assert merged(ours, {"upstream": "x"}) is None
