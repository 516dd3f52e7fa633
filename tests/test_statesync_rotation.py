"""Rotation overlaps epochs: the next document is built beside the live one, settled
entries are the same items on every instance, recent ones come from their writer, and
reads fall back to the old document until they have arrived."""

from __future__ import annotations

import json
import time
from typing import Any

from prometheus_client import CollectorRegistry
from pycrdt import Doc, Map
from skyroute.statesync import StateSync, SyncSettings
from skyroute.statesync._control import ahead_frame
from skyroute.statesync._doc import DocHub, EpochDoc
from skyroute.statesync._links import _on_control as on_control
from skyroute.statesync._protocol import ConnState, YConnection, message_kind
from skyroute.statesync._rotation import (
    Carry,
    CarryRules,
    EpochBuilder,
    bucket_of_key,
    shared_bucket,
)

from .conftest import eventually
from .test_statesync_peers import Instance, all_connected, bound_socket, start_instance, upstream_of

SETTLED_TS = 100.0


def by_ts(map_name: str, key: str, value: Any) -> tuple[Any, Carry]:
    """Rules for the builder tests: values stamped before ``SETTLED_TS`` are settled (and
    the test knows nothing older of an entry); the others are ours."""
    return (value, Carry.SHARED) if value["ts"] < SETTLED_TS else (None, Carry.OWN)


BY_TS = CarryRules(by_ts)


def twin_docs(entries: dict[str, dict[str, Any]]) -> tuple[EpochDoc, EpochDoc]:
    """Two documents of one epoch holding the same entries, as two instances would."""
    a, b = EpochDoc("sessions", 1), EpochDoc("sessions", 1)
    for key, value in entries.items():
        a.maps["sessions"][key] = value
    b.doc.apply_update(a.full_update())
    return a, b


def test_EpochBuilder_settled_entries_are_the_same_items_on_every_instance() -> None:
    """Two instances holding the same settled entries build new documents that already
    agree item for item: exchanging them adds nothing; recent entries stay their own."""
    old_a, old_b = twin_docs({f"s{i}": {"upstream": f"u{i}", "ts": 1.0} for i in range(50)})
    old_a.maps["sessions"]["recent"] = {"upstream": "ua", "ts": 500.0}
    new_a = EpochBuilder(old_a, EpochDoc("sessions", 2), BY_TS).finish()
    new_b = EpochBuilder(old_b, EpochDoc("sessions", 2), BY_TS).finish()

    shared = new_a.client_ids() - {new_a.doc.client_id}
    assert shared == new_b.client_ids() - {new_b.doc.client_id}
    buckets = {bucket_of_key("sessions", f"s{i}") for i in range(50)}
    assert len(shared) == len(buckets) and new_a.doc.client_id != new_b.doc.client_id
    # b lacks only a's own part: the recent entry, and nothing of the shared ones.
    assert new_a.diff(new_b.state_vector()) == new_a.own_update()
    new_b.doc.apply_update(new_a.own_update())
    assert dict(new_b.maps["sessions"].items()) == dict(old_a.maps["sessions"].items())


def test_shared_bucket_is_what_pycrdt_writes_for_that_client() -> None:
    """A bucket's update (built through pycrdt's Rust classes) holds the items a Doc with
    that client id writes in key order; its id hangs on the content only."""
    entries = {
        "k2": {"upstream": "u", "ts": 1.5, "attributes": {"n": "7", "a": "b"},
               "pin": {"gen": 0, "at": [17, 0], "by": "w.1"}, "n": None, "ok": True},
        "k1": {"upstream": "v", "ts": 2.5},
    }
    client, update = shared_bucket("sessions", 3, "sessions", 5, entries)
    reordered = {k: dict(reversed(list(v.items()))) for k, v in reversed(list(entries.items()))}
    assert shared_bucket("sessions", 3, "sessions", 5, reordered)[0] == client
    assert shared_bucket("sessions", 4, "sessions", 5, entries)[0] != client
    ours, public = Doc(), Doc(client_id=client)
    with public.transaction():
        for key in sorted(entries):
            public.get("sessions", type=Map)[key] = entries[key]
    ours.get("sessions", type=Map)
    ours.apply_update(update)
    assert ours.get_state() == public.get_state()
    assert dict(ours.get("sessions", type=Map).items()) == entries


def test_EpochBuilder_in_slices_copies_what_changed_as_it_is_now() -> None:
    """Entries written while the build runs end up as they are at the end: one changed
    before its slice, one after (on top of its shared item), one new, one deleted."""
    old, _ = twin_docs({f"s{i}": {"upstream": "old", "ts": 1.0} for i in range(4)})
    builder = EpochBuilder(old, EpochDoc("sessions", 2), BY_TS)
    old.maps["sessions"]["s0"] = {"upstream": "new0", "ts": 500.0}  # before any slice
    while not builder.step(budget_s=1.0):
        pass
    old.maps["sessions"]["s1"] = {"upstream": "new1", "ts": 500.0}  # after its slice
    old.maps["sessions"]["s9"] = {"upstream": "new9", "ts": 500.0}
    del old.maps["sessions"]["s2"]
    new = builder.finish()

    assert dict(new.maps["sessions"].items()) == dict(old.maps["sessions"].items())
    assert builder.counts[Carry.SHARED] == 3 and builder.counts[Carry.OWN] == 2  # s0, s9
    # s1 (and s2) were shared as they were, then overwritten (deleted) by our own items.
    shared = {f"s{i}": {"upstream": "old", "ts": 1.0} for i in (1, 2, 3)}
    buckets: dict[int, dict[str, Any]] = {}
    for key, value in shared.items():
        buckets.setdefault(bucket_of_key("sessions", key), {})[key] = value
    expected = {shared_bucket("sessions", 2, "sessions", b, e)[0] for b, e in buckets.items()}
    assert new.client_ids() - {new.doc.client_id} == expected


def test_SessionStore_carry_rules_share_what_an_entry_held_before_and_leave_the_rest() -> None:
    """An entry's settled value is what it held SETTLE_S before the start (also when it
    was rewritten since); a recent value goes on top: left to a linked writer, or ours."""
    now = time.time()
    sync = StateSync(SyncSettings(instance_id="me", token="t", session_ttl_s=600.0),
                     registry=CollectorRegistry(), clock=lambda: now)
    store, smap = sync.store, sync._hubs["sessions"].doc.maps["sessions"]

    def session(ts: float, by: str, upstream: str = "u") -> dict[str, Any]:
        return {"upstream": upstream, "created": ts, "last_seen": ts, "attributes": {},
                "ts": ts, "by": by}

    old, recent = session(now - 60, "peer.1"), session(now - 0.5, "peer.1", "v")
    for key in "abcdef":
        smap[key] = old
    smap["b"] = recent  # rewritten since: its old value stays the shared one
    smap["g"] = session(now - 0.5, "peer.1")  # new since
    split = store.carry_rules(start=now, linked=frozenset({"peer.1"})).split
    assert split("sessions", "a", old) == (old, Carry.SHARED)
    assert split("sessions", "b", recent) == (old, Carry.WRITER)
    assert split("sessions", "g", smap["g"]) == (None, Carry.WRITER)
    assert split("sessions", "d", session(now - 0.5, sync.writer_id)) == (old, Carry.OWN)
    assert split("sessions", "e", session(now - 0.5, "gone.2")) == (old, Carry.OWN)
    assert split("sessions", "f", session(now - 3600, "peer.1")) == (None, Carry.DROP)


async def test_StateSync_rotation_reads_an_entry_left_to_its_writer_and_carries_it_late() -> None:
    """An entry left to a linked writer is read from the old document until it arrives;
    when the overlap ends without it (the writer went away), this instance carries it."""
    registry = CollectorRegistry()
    sync = StateSync(SyncSettings(instance_id="me", token="t"), registry=registry)
    hub = sync._hubs["sessions"]
    peer = YConnection(hub, name="peer", external=False, on_send=lambda m: None)
    peer.peer, peer.rotates_in_band = "peer.1", True
    hub.attach(peer)
    now = time.time()
    hub.doc.maps["sessions"]["conv"] = {"upstream": "up-peer", "created": now, "last_seen": now,
                                        "attributes": {}, "ts": now, "by": "peer.1"}

    await sync.rotate()

    assert hub.doc.maps["sessions"].get("conv") is None  # left to peer.1 ...
    assert hub.previous is not None
    got = sync.store.get("conv", now=now)
    assert got is not None and got.upstream == "up-peer"  # ... and read meanwhile
    hub.detach(peer)  # the writer is gone: the overlap ends without its copy
    assert hub.previous is None
    assert dict(hub.doc.maps["sessions"]["conv"])["upstream"] == "up-peer"
    assert registry.get_sample_value("skyroute_sync_rotation_entries_total", {"how": "late"}) == 1


async def test_StateSync_rotation_exchanges_only_what_differs() -> None:
    """Three linked instances rotating together send each other their recent writes,
    not their documents: far fewer bytes than one document, and they agree after."""
    socks = [bound_socket() for _ in range(3)]
    ports = [s.getsockname()[1] for s in socks]
    mesh = [await start_instance(f"r{n}", sock, [p for p in ports if p != ports[n]])
            for n, sock in enumerate(socks)]
    try:
        await eventually(lambda: all_connected(*mesh))
        old = time.time() - 30  # settled by the time of the rotation
        for n in range(300):
            mesh[n % 3].sync.store.pin(f"old-{n}", f"up-{n % 5}", now=old,
                                       attributes={"conversation": f"c-{n:04d}" * 8})
        mesh[0].sync.store.pin("recent", "up-r", now=time.time())
        await eventually(lambda: all(upstream_of(i, f"old-{n}") == f"up-{n % 5}"
                                     for i in mesh for n in range(300))
                         and all(upstream_of(i, "recent") == "up-r" for i in mesh))
        size = mesh[0].sync.document_sizes()["sessions"]
        received = [i.metric("skyroute_sync_bytes_total", direction="in") for i in mesh]
        epoch = mesh[0].sync.epoch
        for inst in mesh:  # the same turn of the event loop, as the clock would have it
            await inst.sync.rotate(epoch + 1)

        await eventually(lambda: all(h.previous is None for i in mesh
                                     for h in i.sync._hubs.values()))
        assert all(i.metric("skyroute_sync_rotation_entries_total", how="shared") >= 300
                   for i in mesh)
        views = [dict(i.sync._hubs["sessions"].doc.maps["sessions"].items()) for i in mesh]
        assert views[0] == views[1] == views[2] and len(views[0]) == 301
        for inst, before in zip(mesh, received, strict=True):
            got = inst.metric("skyroute_sync_bytes_total", direction="in") - before
            assert got < size / 4, (inst.name, got, size)  # before: the whole doc, twice
    finally:
        for inst in mesh:
            await inst.stop()


async def test_StateSync_write_after_rotation_reaches_a_peer_still_building() -> None:
    """A write right after one instance rotates reaches its peer at once: the peer
    finishes its own build on the epoch frame, and the write sits on a shared item."""
    socks = [bound_socket(), bound_socket()]
    ports = [s.getsockname()[1] for s in socks]
    a = await start_instance("a", socks[0], [ports[1]])
    b = await start_instance("b", socks[1], [ports[0]])
    insts: list[Instance] = [a, b]
    try:
        await eventually(lambda: all_connected(a, b))
        a.sync.store.pin("conv", "up-1", now=time.time() - 30)
        await eventually(lambda: upstream_of(b, "conv") == "up-1")
        await a.sync.rotate()
        stored = a.sync.store.get("conv", now=time.time())
        assert stored is not None
        assert a.sync.store.pin("conv", "up-2", now=time.time(), moved_from="up-1")
        await eventually(lambda: b.sync.epoch == a.sync.epoch and upstream_of(b, "conv") == "up-2")
        assert b.metric("skyroute_sync_rotations_total") == 1
    finally:
        for inst in insts:
            await inst.stop()


def test_EpochBuilder_entry_taken_over_by_another_writer_follows_the_old_document() -> None:
    """An entry this build already wrote as its own, then rewritten by another (linked)
    writer before the build ends, is copied again: our older item must not stand beside
    that writer's and win the tie between the two."""
    old, _ = twin_docs({})
    mine = CarryRules(lambda m, k, v: (None, Carry.OWN if v["by"] == "me" else Carry.WRITER))
    old.maps["sessions"]["conv"] = {"upstream": "up-1", "ts": 500.0, "by": "me"}
    builder = EpochBuilder(old, EpochDoc("sessions", 2), mine)
    while not builder.step(budget_s=1.0):
        pass
    assert dict(builder.new.maps["sessions"]["conv"])["upstream"] == "up-1"
    old.maps["sessions"]["conv"] = {"upstream": "up-2", "ts": 501.0, "by": "peer.1"}

    new = builder.finish()

    assert dict(new.maps["sessions"]["conv"])["upstream"] == "up-2"


class Wire:
    """One direction of a peer link whose delay the test controls: what one side sends
    waits here until the test delivers it, in order, as the socket would."""

    def __init__(self) -> None:
        self.queue: list[bytes | str] = []

    def deliver(self, conn: YConnection, hub: DocHub, count: int | None = None) -> int:
        """Hand the first ``count`` (default: all) queued messages to ``conn`` on ``hub``
        the way the link's receive loop does; return how many were delivered."""
        batch = self.queue[:count] if count is not None else list(self.queue)
        del self.queue[:len(batch)]
        for message in batch:
            if isinstance(message, bytes):
                hub.receive(conn, message)
                continue
            on_control(message, conn, hub, hub._metrics, None, now=0.0)  # as the link does
        return len(batch)


def wired(a: StateSync, b: StateSync) -> tuple[Wire, YConnection, Wire, YConnection]:
    """Link the sessions documents of ``a`` and ``b`` through two controlled wires, as an
    in-band rotating peer link would: (a -> b, b's end, b -> a, a's end)."""
    hub_a, hub_b = a._hubs["sessions"], b._hubs["sessions"]
    to_b, to_a = Wire(), Wire()
    end_a = YConnection(hub_a, name="a->b", external=False, on_send=to_b.queue.append)
    end_b = YConnection(hub_b, name="b->a", external=False, on_send=to_a.queue.append)
    for end, hub, peer in ((end_a, hub_a, b.writer_id), (end_b, hub_b, a.writer_id)):
        end.peer, end.rotates_in_band, end.peer_epoch = peer, True, hub.doc.epoch
    to_b.queue.extend(end_a.initial_messages())
    to_a.queue.extend(end_b.initial_messages())
    hub_a.attach(end_a)
    hub_b.attach(end_b)
    return to_b, end_b, to_a, end_a


async def test_StateSync_write_in_flight_at_the_rotation_is_applied_on_arrival() -> None:
    """A write sent just before the switch, still on the wire when its peer rotates,
    counts in the peer's new epoch as soon as it arrives: it does not wait one more
    delay for its writer's part. Both copies agree, and the two documents end equal."""
    registry = CollectorRegistry()
    settings = {"token": "t", "session_ttl_s": 600.0}
    a = StateSync(SyncSettings(instance_id="a", **settings), registry=CollectorRegistry())
    b = StateSync(SyncSettings(instance_id="b", **settings), registry=registry)
    hub_a, hub_b = a._hubs["sessions"], b._hubs["sessions"]
    to_b, end_b, to_a, end_a = wired(a, b)

    def settle() -> None:  # deliver both ways until nothing is in flight
        while to_b.deliver(end_b, hub_b) + to_a.deliver(end_a, hub_a):
            pass

    settle()
    now = time.time()
    a.store.pin("conv", "up-1", now=now - 30)  # settled: a shared item on both sides
    settle()
    assert b.store.get("conv", now=now) is not None
    assert a.store.pin("conv", "up-2", now=now, moved_from="up-1")  # just before the switch
    a.store.pin("fresh", "up-3", now=now)
    in_flight = len(to_b.queue)
    assert in_flight > 0
    epoch = max(a.epoch, b.epoch) + 1
    await a.rotate(epoch)  # both rotate at the same moment, the writes still on the wire
    await b.rotate(epoch)
    assert len(to_b.queue) > in_flight  # behind them: a's epoch frame and a's own part

    to_b.deliver(end_b, hub_b, count=in_flight)  # one delay: only what was in flight

    assert hub_b.doc.epoch == epoch and end_b.peer_epoch < epoch  # a's part not yet here
    for key, upstream in (("conv", "up-2"), ("fresh", "up-3")):
        got = b.store.get(key, now=now)
        assert got is not None and got.upstream == upstream, key
        assert dict(hub_b.doc.maps["sessions"][key])["upstream"] == upstream, key
    assert registry.get_sample_value("skyroute_sync_rotation_entries_total",
                                     {"how": "in_flight"}) == 2
    assert registry.get_sample_value("skyroute_sync_update_apply_seconds_count") is not None

    settle()  # the rest: a's part, the SYNC_STEP1/2 of the new epoch
    views = [dict(h.doc.maps["sessions"].items()) for h in (hub_a, hub_b)]
    assert views[0] == views[1]
    assert {k: v["upstream"] for k, v in views[0].items()} == {"conv": "up-2", "fresh": "up-3"}
    assert hub_a.previous is None and hub_b.previous is None  # the overlap ended
    await a.aclose()
    await b.aclose()


async def test_StateSync_part_sent_ahead_leaves_little_for_the_switch() -> None:
    """Each instance sends its own part of the next epoch's document once its build is
    done, before the install: the peer integrates it then, and at the switch only what
    was written since crosses the wire. Both documents end equal, as without it."""
    settings = {"token": "t", "session_ttl_s": 600.0}
    registry = CollectorRegistry()
    a = StateSync(SyncSettings(instance_id="a", **settings), registry=registry)
    b = StateSync(SyncSettings(instance_id="b", **settings), registry=CollectorRegistry())
    hub_a, hub_b = a._hubs["sessions"], b._hubs["sessions"]
    to_b, end_b, to_a, end_a = wired(a, b)

    def settle() -> None:
        while to_b.deliver(end_b, hub_b) + to_a.deliver(end_a, hub_a):
            pass

    settle()
    now = time.time()
    for n in range(40):  # recent writes: each carried by its writer, in its own part
        a.store.pin(f"a-{n}", "up-a", now=now)
        b.store.pin(f"b-{n}", "up-b", now=now)
    settle()
    epoch = max(a.epoch, b.epoch) + 1
    for sync in (a, b):  # both build, by the clock, and are done before the install
        sync._start_build(epoch)
        assert sync._building is not None
        for builder in sync._building[2].values():
            while not builder.step(budget_s=1.0):
                pass
        sync._build_done(send_ahead=True)
    ahead = [m for m in to_b.queue if isinstance(m, str) and '"ahead"' in m]
    assert len(ahead) == 1
    settle()  # the parts sent ahead reach the documents being built
    assert {f"a-{n}" for n in range(40)} <= set(b._building[2]["sessions"].new.maps["sessions"])
    a.store.pin("late", "up-late", now=time.time())  # written after the part went ahead
    settle()

    a._finish_build()  # the switch, the same moment on both
    b._finish_build()
    parts = [m for m in to_b.queue if isinstance(m, bytes) and message_kind(m) == "sync_update"]
    assert parts and len(parts[0]) < 1000  # "late" and a's heartbeat, not the 40 sessions
    settle()

    views = [dict(h.doc.maps["sessions"].items()) for h in (hub_a, hub_b)]
    assert views[0] == views[1] and len(views[0]) == 81
    assert hub_a.previous is None and hub_b.previous is None
    assert a.store.get("b-7", now=time.time()) is not None
    await a.aclose()
    await b.aclose()


async def test_StateSync_part_sent_ahead_is_checked_like_any_update() -> None:
    """A part sent ahead that breaks the schema is refused whole: counted, the link
    closed, the document being built untouched. A frame whose part is not base64 is
    ignored like an unknown key."""
    registry = CollectorRegistry()
    b = StateSync(SyncSettings(instance_id="b", token="t"), registry=registry)
    hub = b._hubs["sessions"]
    peer = YConnection(hub, name="peer", external=False, on_send=lambda m: None)
    peer.peer, peer.rotates_in_band, peer.peer_epoch = "a.1", True, hub.doc.epoch
    hub.attach(peer)
    epoch = b.epoch + 1
    b._start_build(epoch)
    assert b._building is not None
    for builder in b._building[2].values():
        while not builder.step(budget_s=1.0):
            pass
    b._build_done(send_ahead=False)
    building = b._building[2]["sessions"].new
    forged = Doc()
    forged.get("sessions", type=Map)["conv"] = {"upstream": 42}  # not a string
    metrics = hub._metrics

    not_base64 = json.dumps({"ahead": epoch, "part": "%%not base64"})
    on_control(not_base64, peer, hub, metrics, None, now=0.0)
    assert peer.state is ConnState.OPEN
    on_control(ahead_frame(epoch, forged.get_update()), peer, hub, metrics, None, now=0.0)

    assert peer.state is ConnState.CLOSED and "bad update" in (peer.close_reason or "")
    assert registry.get_sample_value("skyroute_sync_updates_rejected_total",
                                     {"doc": "sessions", "reason": "schema"}) == 1
    assert "conv" not in building.maps["sessions"]
    await b.aclose()
