"""The relay rule (``_relay``) and the control frames and liveness rule (``_control``).

Pure: plain objects for connections, a fake monotonic time for liveness.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from skyroute.statesync._control import (
    Control,
    Liveness,
    hello_frame,
    links_frame,
    ping_frame,
    pong_frame,
    read_control,
)
from skyroute.statesync._relay import relay_targets


@dataclass(eq=False)
class Conn:
    peer: str | None
    peer_links: frozenset[str] | None = None


def names(conns: list[Conn]) -> list[str | None]:
    return [c.peer for c in conns]


def test_relay_targets_local_write_goes_once_to_every_peer_and_every_client() -> None:
    """A local write reaches each instance once (two links to B count once) and each client."""
    b_out, b_in, c, client = Conn("B"), Conn("B"), Conn("C"), Conn(None)
    assert names(relay_targets([b_out, b_in, c, client], origin=None)) == ["B", "C", None]


RELAY_CASES = [
    # (what C says it is linked to, whether C gets A's change relayed by us)
    (frozenset({"A", "us"}), False),  # full mesh: A already sent it to C
    (frozenset({"us"}), True),  # C cannot hear A: we are its path
    (None, True),  # C has not said (an older instance): a duplicate beats a gap
]


@pytest.mark.parametrize(("c_links", "relayed"), RELAY_CASES)
def test_relay_targets_skip_instances_linked_to_the_sender(
    c_links: frozenset[str] | None, relayed: bool
) -> None:
    """A change from A is relayed to C only if C did not say it is linked to A."""
    a, c, client = Conn("A", frozenset({"us", "C"})), Conn("C", c_links), Conn(None)
    got = relay_targets([a, c, client], origin=a)
    assert names(got) == (["C", None] if relayed else [None])


def test_relay_targets_never_back_to_the_sending_instance_on_its_other_link() -> None:
    """Two links to A (one dialled by each side): neither carries A's change back."""
    a_out, a_in = Conn("A"), Conn("A")
    assert relay_targets([a_out, a_in], origin=a_out) == []


def test_relay_targets_change_from_a_client_goes_to_every_peer() -> None:
    """A Yjs client's write is not known to any peer, whatever they are linked to."""
    client = Conn(None)
    a, b = Conn("A", frozenset({"B"})), Conn("B", frozenset({"A"}))
    assert names(relay_targets([client, a, b], origin=client)) == ["A", "B"]


def test_control_frames_round_trip_and_ignore_what_they_do_not_know() -> None:
    """Each frame decodes to what was sent; junk and unknown keys are harmless."""
    assert read_control(hello_frame("s1.ab")) == Control(instance="s1.ab", speaks_ping=True)
    assert read_control(ping_frame(4)) == Control(ping=4)
    assert read_control(pong_frame(4)) == Control(pong=4)
    assert read_control(links_frame(["b", "a"])) == Control(links=frozenset({"a", "b"}))
    assert read_control('{"instance": "old"}') == Control(instance="old")  # older hello
    assert read_control("not json") is None
    assert read_control("[1]") is None
    assert read_control('{"ping": "x", "links": "a", "future": 1}') == Control()


def test_Liveness_dead_after_misses_intervals_of_silence_once_armed() -> None:
    """Silence kills an armed link after interval x misses; any frame restarts the count."""
    live = Liveness(interval_s=1.0, misses=3, now=100.0)
    assert not live.is_dead(now=110.0)  # not armed: an older peer may never pong
    live.arm()
    live.on_frame(now=110.0)
    assert not live.is_dead(now=112.9)
    assert live.is_dead(now=113.0)
    live.on_frame(now=113.5)
    assert not live.is_dead(now=116.0)


def test_Liveness_pong_gives_round_trip_and_arms() -> None:
    """A pong for a ping sent at t gives now - t; an unknown or forgotten seq gives None."""
    live = Liveness(interval_s=1.0, misses=3, now=0.0)
    seq = live.next_ping(now=10.0)
    assert live.on_pong(seq, now=10.04) == pytest.approx(0.04)
    assert live.on_pong(seq, now=10.05) is None  # answered already
    first = live.next_ping(now=11.0)
    for t in range(12, 17):
        live.next_ping(now=float(t))
    assert live.on_pong(first, now=17.0) is None  # older than the misses window
    assert live.is_dead(now=19.9) is False  # heard at 17.0
    assert live.is_dead(now=20.0) is True


def test_Liveness_rejects_nonsense_settings() -> None:
    """A zero interval or no allowed misses is a programming error."""
    with pytest.raises(ValueError, match="interval_s"):
        Liveness(interval_s=0.0, misses=3, now=0.0)
    with pytest.raises(ValueError, match="misses"):
        Liveness(interval_s=1.0, misses=0, now=0.0)


def test_Liveness_seconds_left_counts_down_to_the_cut() -> None:
    """The ping loop wakes when silence would kill the link, not a whole interval later."""
    live = Liveness(interval_s=1.0, misses=3, now=0.0)
    assert live.seconds_left(now=5.0) == 1.0  # unarmed: just the next ping
    live.arm()
    live.on_frame(now=10.0)
    assert live.seconds_left(now=12.25) == pytest.approx(0.75)
    assert live.seconds_left(now=14.0) == 0.0
