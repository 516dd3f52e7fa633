"""Session affinity: what an answered request does to its session's pin."""

from __future__ import annotations

import pytest
from skyroute.routing import Pin, Touch, affinity_after

CASES = [
    # (pinned, served_by, status, fallback, decision)
    (None, "a", 200, False, Pin(upstream="a")),
    ("a", "a", 200, False, Touch()),
    # moved: re-pin where the answer came from, saying which pin it moves away from
    ("a", "b", 200, False, Pin(upstream="b", moved_from="a")),
    ("a", "gpu", 200, True, None),  # a fallback model's answer never pins
    (None, "gpu", 200, True, None),
    ("a", "a", 400, False, None),  # the client's mistake passed on: nothing changes
    ("a", "b", 503, False, None),
    (None, "-", 429, False, None),
]


@pytest.mark.parametrize(("pinned", "served_by", "status", "fallback", "decision"), CASES)
def test_affinity_after_pins_touches_or_leaves_the_session(pinned, served_by, status,
                                                           fallback, decision):
    """An answer pins the session to the upstream that gave it (or touches it if already
    there); errors and fallback answers leave it alone."""
    assert affinity_after(pinned=pinned, served_by=served_by, status=status,
                          fallback=fallback) == decision
