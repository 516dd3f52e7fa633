"""``ObjectDirectory``: object id -> upstream, shared, expiring and bounded (no sockets)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from skyroute.statesync import StateSync, SyncSettings

from .fakes import FakeClock
from .test_statesync_doc import DocPair

DAY = 86400.0
START = 1_000_000.0


def directory_pair() -> tuple[StateSync, StateSync, FakeClock]:
    clock = FakeClock(START)
    a, b = (StateSync(SyncSettings(instance_id=name, token="t"), registry=CollectorRegistry(),
                      clock=clock.now) for name in ("a", "b"))
    return a, b, clock


def test_ObjectDirectory_remembers_and_peers_see_it() -> None:
    """An object remembered on one instance is found on the other after sync."""
    a, b, _ = directory_pair()
    hub_a, hub_b = a._hubs["sessions"], b._hubs["sessions"]
    pair = DocPair(hub_a, hub_b)
    pair.deliver()
    a.objects.remember("file-abc123", "us-east", now=START, ttl_s=30 * DAY, max_entries=10)
    pair.deliver()
    assert b.objects.upstream_of("file-abc123", now=START + 1) == "us-east"
    assert b.objects.upstream_of("file-other", now=START + 1) is None


def test_ObjectDirectory_entries_expire_after_their_ttl() -> None:
    """An entry is returned until its TTL passes, and not after."""
    a, _, _ = directory_pair()
    a.objects.remember("resp_1", "b", now=START, ttl_s=DAY, max_entries=10)
    assert a.objects.upstream_of("resp_1", now=START + DAY - 1) == "b"
    assert a.objects.upstream_of("resp_1", now=START + DAY + 1) is None


def test_ObjectDirectory_stays_bounded_dropping_the_oldest() -> None:
    """Past max_entries the oldest entries go, down to 90 % of the cap."""
    a, _, _ = directory_pair()
    for i in range(11):
        a.objects.remember(f"file-{i}", "up", now=START + i, ttl_s=DAY, max_entries=10)
    assert len(a.objects) == 9
    assert a.objects.upstream_of("file-0", now=START + 20) is None
    assert a.objects.upstream_of("file-10", now=START + 20) == "up"


def test_ObjectDirectory_bound_counts_entries_a_peer_wrote() -> None:
    """Entries written at a peer count towards max_entries here; a rewrite of one id is
    no new entry."""
    a, b, _ = directory_pair()
    pair = DocPair(a._hubs["sessions"], b._hubs["sessions"])
    pair.deliver()
    for i in range(8):
        b.objects.remember(f"file-{i}", "up", now=START + i, ttl_s=DAY, max_entries=10)
    pair.deliver()
    a.objects.remember("file-0", "up", now=START + 20, ttl_s=DAY, max_entries=10)
    assert len(a.objects) == len(a._hubs["sessions"].doc.maps["objects"]) == 8
    for i in range(8, 11):
        a.objects.remember(f"file-{i}", "up", now=START + 20 + i, ttl_s=DAY, max_entries=10)
    assert len(a.objects) == len(a._hubs["sessions"].doc.maps["objects"]) == 9
    assert a.objects.upstream_of("file-1", now=START + 40) is None  # the oldest went first
    assert a.objects.upstream_of("file-0", now=START + 40) == "up"  # rewritten: recent


async def test_ObjectDirectory_rotation_keeps_live_entries_only() -> None:
    """A rotation carries live entries into the new document and drops expired ones."""
    a, _, clock = directory_pair()
    a.objects.remember("file-old", "up", now=START, ttl_s=10.0, max_entries=10)
    a.objects.remember("file-new", "up", now=START, ttl_s=DAY, max_entries=10)
    clock.advance(60.0)
    await a.rotate()
    assert len(a.objects) == 1
    assert a.objects.upstream_of("file-new", now=clock.now()) == "up"


def test_ObjectDirectory_ignores_malformed_foreign_values() -> None:
    """A value a foreign Yjs client wrote in another shape is ignored, not raised on."""
    a, _, _ = directory_pair()
    a._hubs["sessions"].doc.maps["objects"]["file-x"] = {"upstream": 3}
    a._hubs["sessions"].doc.maps["objects"]["file-y"] = "nonsense"
    assert a.objects.upstream_of("file-x", now=START) is None
    assert a.objects.upstream_of("file-y", now=START) is None
