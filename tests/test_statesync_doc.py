"""Documents, the y-protocols core and the store, joined in memory (no sockets).

``DocPair`` is h11's ``ConnectionPair`` for Yjs: two hubs, each with a
``YConnection`` whose sends land in the other's inbox; ``deliver`` runs the
conversation until both inboxes are empty.
"""

from __future__ import annotations

import gc
import itertools
import random
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from pycrdt import Doc, Map, create_awareness_message, create_sync_message
from skyroute.routing import UpstreamState
from skyroute.statesync import (
    SnapshotError,
    SyncConfigError,
    SyncProtocolError,
    SyncSettings,
    Usage,
    UsageBucket,
)
from skyroute.statesync._doc import (
    BULK_UPDATE_BYTES,
    DocHub,
    EpochDoc,
    collector_paused,
    decode_snapshot,
    encode_snapshot,
    rebuild,
)
from skyroute.statesync._links import BACKOFF_CAP_S, link_backoff
from skyroute.statesync._metrics import SyncMetrics
from skyroute.statesync._protocol import ConnState, YConnection, message_kind
from skyroute.statesync._store import USAGE_DELETE_AFTER_S, SessionStore

from .fakes import FakeClock

WALL_CLOCK_START = 1_000_000.0
"""Store clocks are wall-clock epoch seconds; any large value will do."""


def make_hub(name: str = "sessions", epoch: int = 1) -> DocHub:
    return DocHub(EpochDoc(name, epoch), metrics=SyncMetrics(CollectorRegistry()))


class DocPair:
    """Two hubs joined by an in-memory link."""

    def __init__(self, a: DocHub, b: DocHub, *, connect: bool = True) -> None:
        self.a, self.b = a, b
        self.to_a: list[bytes] = []
        self.to_b: list[bytes] = []
        self.sent = 0
        if connect:
            self.connect()

    def connect(self) -> None:
        self.conn_a = YConnection(self.a, name="a", external=False, on_send=self.to_b.append)
        self.conn_b = YConnection(self.b, name="b", external=False, on_send=self.to_a.append)
        self.a.attach(self.conn_a)
        self.b.attach(self.conn_b)
        self.to_b.extend(self.conn_a.initial_messages())
        self.to_a.extend(self.conn_b.initial_messages())

    def cut(self) -> None:
        for hub, conn in ((self.a, self.conn_a), (self.b, self.conn_b)):
            hub.detach(conn)
            conn.close("cut")
        self.to_a.clear()
        self.to_b.clear()

    def deliver(self, limit: int = 1000) -> int:
        delivered = 0
        while self.to_a or self.to_b:
            assert delivered < limit, "conversation does not terminate"
            if self.to_b:
                self.to_a.extend(self.conn_b.receive_message(self.to_b.pop(0)))
            if self.to_a:
                self.to_b.extend(self.conn_a.receive_message(self.to_a.pop(0)))
            delivered += 1
        return delivered


def snapshot(hub: DocHub, map_name: str = "sessions") -> dict[str, Any]:
    return dict(hub.doc.maps[map_name].items())


def test_DocPair_converges_after_initial_sync() -> None:
    """Entries written on both sides before connecting are on both sides after sync."""
    a, b = make_hub(), make_hub()
    a.doc.maps["sessions"]["s1"] = {"upstream": "x"}
    b.doc.maps["sessions"]["s2"] = {"upstream": "y"}
    DocPair(a, b).deliver()
    assert snapshot(a) == snapshot(b) == {"s1": {"upstream": "x"}, "s2": {"upstream": "y"}}


def test_DocPair_live_update_is_relayed_once_and_not_echoed() -> None:
    """A local write after sync reaches the other side as one update and comes back as nothing."""
    pair = DocPair(make_hub(), make_hub())
    pair.deliver()
    pair.a.doc.maps["sessions"]["s1"] = {"upstream": "x"}
    assert [message_kind(m) for m in pair.to_b] == ["sync_update"]
    pair.deliver()
    assert not pair.to_a and snapshot(pair.b) == {"s1": {"upstream": "x"}}


def test_DocPair_concurrent_writes_to_one_key_converge() -> None:
    """Two sides setting the same key while apart agree on one value after the heal."""
    pair = DocPair(make_hub(), make_hub())
    pair.deliver()
    pair.cut()
    pair.a.doc.maps["sessions"]["s"] = {"upstream": "a"}
    pair.b.doc.maps["sessions"]["s"] = {"upstream": "b"}
    pair.connect()
    pair.deliver()
    assert snapshot(pair.a) == snapshot(pair.b)


def test_DocHub_relay_terminates_in_a_full_mesh() -> None:
    """Three hubs in a triangle relay an update to everyone and then fall silent."""
    a, b, c = make_hub(), make_hub(), make_hub()
    pairs = [DocPair(a, b), DocPair(b, c), DocPair(a, c)]
    for pair in pairs:
        pair.deliver()
    a.doc.maps["sessions"]["k"] = {"upstream": "u"}
    for _ in range(3):
        for pair in pairs:
            pair.deliver()
    assert snapshot(a) == snapshot(b) == snapshot(c) == {"k": {"upstream": "u"}}
    assert all(not p.to_a and not p.to_b for p in pairs)


def test_YConnection_malformed_message_closes_connection() -> None:
    """Garbage raises SyncProtocolError, leaves the connection CLOSED, and later calls fail."""
    pair = DocPair(make_hub(), make_hub())
    with pytest.raises(SyncProtocolError):
        pair.conn_a.receive_message(b"\x00\x02\x05\xff\xff")
    assert pair.conn_a.state is ConnState.CLOSED
    with pytest.raises(SyncProtocolError, match="closed connection"):
        pair.conn_a.receive_message(b"\x00\x00\x01\x00")


def test_YConnection_awareness_is_answered_to_external_clients() -> None:
    """An awareness update from a Yjs client is echoed back to it (keeps y-websocket alive)."""
    hub = make_hub()
    out: list[bytes] = []
    conn = YConnection(hub, name="yjs", external=True, on_send=out.append)
    hub.attach(conn)
    client = Doc()
    # one client, clock 1, state {"user": "n"}: the y-protocols awareness encoding
    payload = bytes([1]) + _varuint(client.client_id) + bytes([1]) + _varstr('{"user":"n"}')
    conn.receive_message(create_awareness_message(payload))
    assert [message_kind(m) for m in out] == ["awareness"]
    assert [message_kind(m) for m in conn.receive_message(bytes([3]))] == ["awareness"]


def test_DocHub_install_refuses_client_holding_older_epoch_doc() -> None:
    """After rotation a client whose state names retired client ids is refused."""
    hub = make_hub()
    old_client = Doc()
    old_map = old_client.get("sessions", type=Map)
    hub.doc.maps["sessions"]["s"] = {"upstream": "x"}
    old_client.apply_update(hub.doc.full_update())
    old_map["t"] = {"upstream": "y"}
    hub.install(rebuild(hub.doc, 2, lambda *_: True))
    conn = YConnection(hub, name="old", external=True, on_send=lambda m: None)
    with pytest.raises(SyncProtocolError, match="older epoch"):
        conn.receive_message(create_sync_message(old_client))


def test_collector_paused_restores_the_collector_as_it_was() -> None:
    """Paused only when asked, enabled again after an error, left off if it was off."""
    assert gc.isenabled()
    with collector_paused(False):
        assert gc.isenabled()
    with pytest.raises(RuntimeError), collector_paused():
        assert not gc.isenabled()
        raise RuntimeError("boom")
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_DocHub_bulk_update_is_checked_and_applied_whole() -> None:
    """An update past BULK_UPDATE_BYTES (a catch-up) arrives whole, and a bad one not at all."""
    a, b = make_hub(), make_hub()
    with a.doc.doc.transaction():
        for i in range(2000):
            a.doc.maps["sessions"][f"s{i}"] = {"upstream": "up", "ts": 1.0, "by": "a"}
    update = a.doc.full_update()
    assert len(update) >= BULK_UPDATE_BYTES
    pair = DocPair(a, b)
    pair.deliver()
    assert snapshot(b) == snapshot(a) and gc.isenabled()
    bad = make_hub()
    bad.doc.doc.apply_update(update)
    with bad.doc.doc.transaction():
        bad.doc.maps["sessions"]["evil"] = {"upstream": "up", "evil": 1}
    fresh = make_hub()
    with pytest.raises(SyncProtocolError):
        fresh.apply_remote(bad.doc.full_update(), origin=pair.conn_b)
    assert len(fresh.doc.maps["sessions"]) == 0 and gc.isenabled()


def test_rebuild_drops_history_and_expired_entries() -> None:
    """A rebuilt document keeps only what ``keep`` accepts and is smaller than the old one."""
    doc = EpochDoc("sessions", 1)
    for i in range(200):
        doc.maps["sessions"]["hot"] = {"upstream": f"u{i}"}
    doc.maps["sessions"]["dead"] = {"upstream": "gone"}
    new = rebuild(doc, 2, lambda m, k, v: k != "dead")
    assert dict(new.maps["sessions"].items()) == {"hot": {"upstream": "u199"}}
    assert new.epoch == 2 and len(new.full_update()) < len(doc.full_update())


def test_snapshot_round_trips_and_rejects_garbage() -> None:
    """Snapshots decode to what was encoded; anything else is a SnapshotError."""
    assert decode_snapshot(encode_snapshot(7, {"sessions": b"\x00\x00"})) == (
        7,
        {"sessions": b"\x00\x00"},
    )
    with pytest.raises(SnapshotError):
        decode_snapshot(b"not json")


def test_link_backoff_is_jittered_and_capped_under_two_seconds() -> None:
    """Redial delays are jittered and never exceed the cap (<= 2 s, the issue's bound)."""
    delays = list(itertools.islice(link_backoff(random.Random(7)), 200))
    assert BACKOFF_CAP_S <= 2.0
    assert all(0.0 <= d <= BACKOFF_CAP_S for d in delays)
    assert max(delays[50:]) > BACKOFF_CAP_S / 2  # it does grow to the cap


def test_link_backoff_grows_with_jitter_up_to_cap() -> None:
    """Redial delays double from 50 ms, each within [d/2, d] of its ceiling, and stay at the
    1 s cap (routing's generator with equal jitter)."""
    delays = link_backoff(random.Random(5))
    ceilings = [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    for ceiling in ceilings:
        assert ceiling / 2 <= next(delays) <= ceiling
    assert ceilings[-1] == BACKOFF_CAP_S


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"instance_id": ""}, "instance_id"),
        ({"token": ""}, "token"),
        ({"peers": ("http://x/sync",)}, "peers"),
        ({"discovery": "srv:foo"}, "discovery"),
        ({"discovery": "dns:h:70000"}, "discovery"),
        ({"discovery_interval_s": 0}, "discovery_interval_s"),
        ({"flush_interval_s": 0}, "flush_interval_s"),
    ],
)
def test_SyncSettings_rejects_bad_values(kwargs: dict[str, Any], field: str) -> None:
    """Invalid settings raise SyncConfigError naming the field."""
    base: dict[str, Any] = {"instance_id": "s1", "token": "t"}
    with pytest.raises(SyncConfigError, match=field):
        SyncSettings(**{**base, **kwargs})


def test_SyncSettings_parses_discovery_target() -> None:
    """``dns:name[:port]`` gives host and port, defaulting to 8080."""
    s = SyncSettings(instance_id="s1", token="t", discovery="dns:sky.ns.svc:9000")
    assert s.discovery_target() == ("sky.ns.svc", 9000)
    assert SyncSettings(instance_id="s", token=None, discovery="dns:h").discovery_target() == (
        "h",
        8080,
    )


# -- the store over two in-memory linked replicas ---------------------------------------


class StorePair:
    def __init__(self, clock: FakeClock, **overrides: Any) -> None:
        settings = {n: SyncSettings(instance_id=n, token="t", session_ttl_s=100.0, **overrides)
                    for n in "ab"}
        self.hubs = {n: {d: make_hub(d) for d in ("sessions", "usage")} for n in "ab"}
        self.stores = {
            n: SessionStore(
                settings=settings[n],
                writer_id=f"{n}.0",
                sessions=self.hubs[n]["sessions"],
                usage=self.hubs[n]["usage"],
                clock=clock.now,
                metrics=SyncMetrics(CollectorRegistry()),
            )
            for n in "ab"
        }
        self.pairs = [DocPair(self.hubs["a"][d], self.hubs["b"][d]) for d in ("sessions", "usage")]
        self.sync()

    def sync(self) -> None:
        for _ in range(3):
            for store in self.stores.values():
                store.flush()
            for pair in self.pairs:
                pair.deliver()


def test_SessionStore_pin_on_one_replica_is_seen_on_the_other() -> None:
    """A pinned session reads back on the peer with float times and its upstream."""
    clock = FakeClock(WALL_CLOCK_START)
    sp = StorePair(clock)
    sp.stores["a"].pin("s1", "deepseek", now=clock.now())
    sp.sync()
    got = sp.stores["b"].get("s1", now=clock.now())
    assert got is not None and got.upstream == "deepseek" and got.created == clock.now()
    assert sp.stores["b"].get("s1", now=clock.now() + 101) is None  # past the TTL


def test_SessionStore_session_count_follows_local_remote_and_rotated_changes() -> None:
    """The count kept from map events equals the map's size through writes, deletes,
    a peer's writes and a rotation that drops expired sessions."""
    clock = FakeClock(WALL_CLOCK_START)
    sp = StorePair(clock)
    a, b = sp.stores["a"], sp.stores["b"]
    for i in range(5):
        a.pin(f"a{i}", "up", now=clock.now())
    for i in range(3):
        b.pin(f"b{i}", "up", now=clock.now())
    a.pin("a0", "other", now=clock.now(), moved_from="up")  # an update: no new entry
    sp.sync()
    hub_a = sp.hubs["a"]["sessions"]
    assert a.session_count == b.session_count == len(hub_a.doc.maps["sessions"]) == 8
    del sp.hubs["b"]["sessions"].doc.maps["sessions"]["a1"]  # a delete made at the peer
    sp.sync()
    assert a.session_count == len(hub_a.doc.maps["sessions"]) == 7
    clock.advance(60)
    a.touch("a2", now=clock.now())
    clock.advance(60)  # every session but a2 is past the 100 s TTL now
    hub_a.install(rebuild(hub_a.doc, 2, a.keep))
    assert a.session_count == len(hub_a.doc.maps["sessions"]) == 1


def test_SessionStore_evicts_sessions_that_arrived_from_a_peer() -> None:
    """max_sessions holds for sessions another instance wrote, counted from remote changes."""
    clock = FakeClock(WALL_CLOCK_START)
    sp = StorePair(clock, max_sessions=10)
    for i in range(25):
        sp.stores["b"].pin(f"s{i:02}", "up", now=clock.now() + i)
    for pair in sp.pairs:
        pair.deliver()  # b has not flushed: the sessions reached a as remote writes
    assert sp.stores["a"].session_count == 25
    assert sp.stores["a"].flush()
    sessions = sp.hubs["a"]["sessions"].doc.maps["sessions"]
    assert sp.stores["a"].session_count == len(sessions) <= 10
    assert "s24" in sessions and "s00" not in sessions


def test_SessionStore_usage_adds_up_across_replicas_as_ints() -> None:
    """Counts added on both replicas sum on each, and are ints despite Yjs floats."""
    clock = FakeClock(WALL_CLOCK_START)
    sp = StorePair(clock)
    sp.stores["a"].add_usage("k", requests=2, tokens=10, now=clock.now())
    sp.stores["b"].add_usage("k", requests=1, tokens=5, now=clock.now())
    assert sp.stores["a"].usage("k", now=clock.now()) == Usage(2, 10)  # own, before flush
    sp.sync()
    for store in sp.stores.values():
        usage = store.usage("k", now=clock.now())
        assert usage == Usage(3, 15) and type(usage.requests) is int
    assert sp.stores["a"].usage("k", now=clock.now() + 71).requests == 0


def test_SessionStore_counter_is_one_net_entry_per_writer() -> None:
    """Each writer owns one entry per key and bucket holding its net count (a PN-counter),
    so a negative delta (a corrected estimate) lowers the sum everywhere."""
    clock = FakeClock(WALL_CLOCK_START)
    sp = StorePair(clock)
    sp.stores["a"].add_usage("k", requests=1, tokens=100, now=clock.now())
    sp.sync()
    sp.stores["a"].add_usage("k", tokens=-60, now=clock.now())
    sp.stores["b"].add_usage("k", tokens=5, now=clock.now())
    sp.sync()
    for store in sp.stores.values():
        assert store.usage("k", now=clock.now()) == Usage(1, 45)
    entries = list(sp.hubs["b"]["usage"].doc.maps["usage"].values())
    assert sorted((e["w"], e["t"]) for e in entries) == [("a.0", 40), ("b.0", 5)]


def test_SessionStore_usage_buckets_are_one_second_and_leave_the_window_whole() -> None:
    """Usage comes back per 1 s bucket across replicas, oldest first, each counted until
    60 s after it ends; a bucket written without ``s`` (an older writer) is 10 s long."""
    clock = FakeClock(WALL_CLOCK_START)
    sp = StorePair(clock)
    start = clock.now()
    sp.stores["a"].add_usage("k", requests=2, now=start + 0.3)
    sp.stores["b"].add_usage("k", requests=1, tokens=7, now=start + 0.6)
    sp.stores["b"].add_usage("k", requests=1, now=start + 5.2)
    sp.sync()
    assert sp.stores["a"].usage_buckets("k", now=start + 6) == [
        UsageBucket(start=start, end=start + 1, requests=3, tokens=7),
        UsageBucket(start=start + 5, end=start + 6, requests=1, tokens=0),
    ]
    assert sp.stores["a"].usage("k", now=start + 60.9) == Usage(4, 7)
    assert sp.stores["a"].usage("k", now=start + 61.0) == Usage(1, 0)
    legacy = {"key": "k", "b": int(start // 10), "w": "old.0", "r": 4, "t": 0}
    sp.hubs["b"]["usage"].doc.maps["usage"][f"old.0|{legacy['b']}|k"] = legacy
    sp.sync()
    ten = int(start // 10) * 10.0
    assert UsageBucket(start=ten, end=ten + 10, requests=4, tokens=0) in \
        sp.stores["a"].usage_buckets("k", now=start + 6)


def test_SessionStore_writer_deletes_its_entries_once_no_peer_counts_them() -> None:
    """Each writer deletes its own usage entries 30 s after they left the 60 s window, on
    every replica; entries still in the window (or in the grace) stay."""
    clock = FakeClock(WALL_CLOCK_START)
    sp = StorePair(clock)
    sp.stores["a"].add_usage("k", requests=1, now=clock.now())
    sp.stores["b"].add_usage("k", requests=1, now=clock.now())
    sp.sync()
    clock.advance(61.0 + USAGE_DELETE_AFTER_S - 0.5)
    sp.stores["a"].add_usage("k", requests=1, now=clock.now())
    sp.sync()
    assert len(sp.hubs["b"]["usage"].doc.maps["usage"]) == 3  # the old two: still in grace
    clock.advance(1.0)
    sp.sync()
    for n in "ab":
        entries = list(sp.hubs[n]["usage"].doc.maps["usage"].values())
        assert [(e["w"], e["r"]) for e in entries] == [("a.0", 1)]
        assert sp.stores[n].usage("k", now=clock.now()) == Usage(1, 0)


def test_SessionStore_earliest_pin_wins_after_partition() -> None:
    """Two first pins during a cut converge on the earlier one on both replicas."""
    clock = FakeClock(WALL_CLOCK_START)
    sp = StorePair(clock)
    for pair in sp.pairs:
        pair.cut()
    sp.stores["a"].pin("s", "first-choice", now=clock.now())
    sp.stores["b"].pin("s", "later-choice", now=clock.now() + 1)
    for pair in sp.pairs:
        pair.connect()
    sp.sync()
    for store in sp.stores.values():
        got = store.get("s", now=clock.now() + 2)
        assert got is not None and got.upstream == "first-choice"


def test_SessionStore_move_made_knowing_the_pin_replaces_it() -> None:
    """A move (moved_from the pin it saw) wins over that pin, and over a concurrent first pin."""
    clock = FakeClock(WALL_CLOCK_START)
    sp = StorePair(clock)
    a, b = sp.stores["a"], sp.stores["b"]
    a.pin("s", "first", now=clock.now())
    sp.sync()
    for pair in sp.pairs:
        pair.cut()
    assert b.pin("s", "moved", now=clock.now() + 5, moved_from="first")
    a.touch("s", now=clock.now() + 60)  # later by wall clock, but not a pin
    for pair in sp.pairs:
        pair.connect()
    sp.sync()
    for store in sp.stores.values():
        got = store.get("s", now=clock.now() + 61)
        assert got is not None and got.upstream == "moved"


def test_SessionStore_pin_without_seeing_one_does_not_replace_it() -> None:
    """A pin by a caller that saw no pin keeps the earlier pin and only touches the session."""
    clock = FakeClock(WALL_CLOCK_START)
    sp = StorePair(clock)
    sp.stores["a"].pin("s", "first", now=clock.now())
    sp.sync()
    assert not sp.stores["b"].pin("s", "second", now=clock.now() + 1, moved_from=None)
    got = sp.stores["b"].get("s", now=clock.now() + 1)
    assert got is not None and got.upstream == "first" and got.last_seen == clock.now() + 1


def test_SessionStore_owner_reasserts_its_counter_after_a_stale_merge() -> None:
    """If a merge leaves a stale copy of our counter, the next flush writes ours back."""
    clock = FakeClock(WALL_CLOCK_START)
    sp = StorePair(clock)
    sp.stores["a"].add_usage("k", requests=5, now=clock.now())
    sp.sync()
    stale = dict(sp.hubs["b"]["usage"].doc.maps["usage"].items())
    for pair in sp.pairs:
        pair.cut()
    ((key, value),) = stale.items()
    sp.hubs["b"]["usage"].doc.maps["usage"][key] = {**value, "r": 1}  # a stale carried copy
    for pair in sp.pairs:
        pair.connect()
    sp.sync()
    assert sp.stores["b"].usage("k", now=clock.now()) == Usage(5, 0)


def test_SessionStore_health_reports_expire() -> None:
    """An upstream report is visible on the peer until its ``until`` and cleared by ``up``
    or routing's ``healthy``."""
    clock = FakeClock(WALL_CLOCK_START)
    sp = StorePair(clock)
    sp.stores["a"].report_upstream("u1", "down", until=clock.now() + 30, now=clock.now())
    sp.stores["a"].report_upstream("u2", "bad_key", until=None, now=clock.now())
    sp.sync()
    reports = sp.stores["b"].upstream_reports(now=clock.now())
    assert reports["u1"].state == "down" and reports["u1"].reporter == "a"
    assert set(sp.stores["b"].upstream_reports(now=clock.now() + 31)) == {"u2"}
    sp.stores["b"].report_upstream("u2", "up", until=None, now=clock.now())
    sp.sync()
    assert sp.stores["a"].upstream_reports(now=clock.now()) == {"u1": reports["u1"]}
    sp.stores["a"].report_upstream("u1", UpstreamState.HEALTHY, until=None, now=clock.now())
    sp.sync()
    assert sp.stores["b"].upstream_reports(now=clock.now()) == {}


def _varuint(n: int) -> bytes:
    out = bytearray()
    while n > 127:
        out.append(128 | (n & 127))
        n >>= 7
    out.append(n)
    return bytes(out)


def _varstr(s: str) -> bytes:
    data = s.encode()
    return _varuint(len(data)) + data
