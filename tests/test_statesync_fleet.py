"""A fleet of StateSync instances on real websockets (127.0.0.1, port 0).

Each update crosses the wire once per other instance in a full mesh and still
reaches everyone in a chain; a black-holed link is seen and redialled, and state
catches up after the heal.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from skyroute.proxy.demo import TcpForwarder
from skyroute.statesync import StateSync

from .conftest import eventually
from .test_statesync_peers import Instance, all_connected, bound_socket, start_instance, upstream_of

FAST_PINGS: dict[str, Any] = {"ping_interval_s": 0.1, "ping_misses": 3}


class UpdateCounter:
    """Counts local writes (updates with no origin) on every document of one instance."""

    def __init__(self, sync: StateSync) -> None:
        self.count = 0
        for hub in sync._hubs.values():
            hub.doc.on_update(self._on_update)

    def _on_update(self, update: bytes, origin: object | None) -> None:
        if origin is None:
            self.count += 1


def updates_sent(instances: list[Instance]) -> float:
    return sum(
        i.metric("skyroute_sync_messages_total", direction="out", type="sync_update")
        for i in instances
    )


def links_known(instances: list[Instance], peers: int) -> bool:
    """Every instance knows, on every peer connection, whom that peer is linked to."""
    return all(
        len(hub.linked_peers()) == peers
        and all(c.peer_links is not None for c in hub.connections if c.peer is not None)
        for i in instances
        for hub in i.sync._hubs.values()
    )


def link_ids(*instances: Instance) -> set[int]:
    """Identities of the current outbound link attempts (a reconnect makes a new one)."""
    return {id(s.link) for i in instances for sups in i.sync._links.values() for s in sups}


async def start_mesh(count: int, **settings: Any) -> list[Instance]:
    socks = [bound_socket() for _ in range(count)]
    ports = [s.getsockname()[1] for s in socks]
    return [
        await start_instance(f"m{n}", sock, [p for p in ports if p != ports[n]], **settings)
        for n, sock in enumerate(socks)
    ]


@pytest.fixture
async def mesh() -> AsyncIterator[list[Instance]]:
    instances = await start_mesh(4)
    try:
        await eventually(lambda: all_connected(*instances) and links_known(instances, 3))
        yield instances
    finally:
        for inst in instances:
            await inst.stop()


async def test_StateSync_full_mesh_sends_each_update_once_per_peer(
    mesh: list[Instance],
) -> None:
    """In a 4-instance full mesh, messages per update are N-1 = 3, not (N-1)^2 = 9."""
    counters = [UpdateCounter(i.sync) for i in mesh]
    sent_before = updates_sent(mesh)
    written_before = sum(c.count for c in counters)
    for n in range(20):
        mesh[n % 4].sync.store.pin(f"conv-{n}", f"up-{n}", now=time.time())
    await eventually(
        lambda: all(upstream_of(i, f"conv-{n}") == f"up-{n}" for i in mesh for n in range(20))
    )

    def exactly_three_per_update() -> bool:
        written = sum(c.count for c in counters) - written_before
        return written >= 20 and updates_sent(mesh) - sent_before == 3 * written

    await eventually(exactly_three_per_update)


async def test_StateSync_chain_relays_to_the_instance_the_writer_cannot_reach() -> None:
    """a - b - c (no a-c link): a's pin reaches c through b, and c's reaches a."""
    socks = [bound_socket() for _ in range(3)]
    _, pb, pc = (s.getsockname()[1] for s in socks)
    chain = [
        await start_instance("a", socks[0], [pb]),
        await start_instance("b", socks[1], [pc]),
        await start_instance("c", socks[2], []),
    ]
    a, _, c = chain
    try:
        await eventually(lambda: all_connected(a, chain[1]) and links_known(chain[1:2], 2))
        a.sync.store.pin("far", "up-a", now=time.time())
        c.sync.store.pin("back", "up-c", now=time.time())
        await eventually(
            lambda: upstream_of(c, "far") == "up-a" and upstream_of(a, "back") == "up-c"
        )
    finally:
        for inst in chain:
            await inst.stop()


async def test_StateSync_black_holed_link_is_seen_redialled_and_caught_up() -> None:
    """A cut that closes nothing: links leave 'connected', writes made meanwhile arrive after."""
    sock_a, sock_b = bound_socket(), bound_socket()
    to_b = TcpForwarder(sock_b.getsockname()[1])
    to_a = TcpForwarder(sock_a.getsockname()[1])
    await to_b.start()
    await to_a.start()
    a = await start_instance("a", sock_a, [to_b.port], **FAST_PINGS)
    b = await start_instance("b", sock_b, [to_a.port], **FAST_PINGS)
    try:
        await eventually(lambda: all_connected(a, b))
        to_a.black_hole()
        to_b.black_hole()
        await eventually(
            lambda: not any(s == "connected" for i in (a, b) for s in i.sync.peer_states().values())
        )
        assert a.metric("skyroute_sync_peers_connected") == 0
        assert a.metric("skyroute_sync_links_silent_total") >= 1
        a.sync.store.pin("during-cut", "up-a", now=time.time())
        b.sync.store.pin("also-during", "up-b", now=time.time())
        to_a.heal()
        to_b.heal()
        await eventually(
            lambda: upstream_of(b, "during-cut") == "up-a"
            and upstream_of(a, "also-during") == "up-b"
        )
        await eventually(lambda: all_connected(a, b))
        assert a.metric("skyroute_sync_ping_seconds_count") > 0
    finally:
        for inst in (a, b):
            await inst.stop()
        await to_a.aclose()
        await to_b.aclose()


FOLLOW_UP_OFFSETS_S = (0.0, 0.001, 0.01, 0.1)
ONE_WAY_DELAY_S = 0.05


async def test_StateSync_follow_ups_at_another_instance_keep_the_first_pin() -> None:
    """Follow-ups reaching b 0/1/10/100 ms after a's first answer (50 ms away) all end on a's pin.

    A follow-up that reaches b before a's pin does is served by b's own choice and
    pinned there without having seen a pin; by the pin rule the earlier pin wins on
    both instances, so the session stays where its first answer (and KV cache) is.
    """
    sock_a, sock_b = bound_socket(), bound_socket()
    to_a = TcpForwarder(sock_a.getsockname()[1], delay_s=ONE_WAY_DELAY_S)
    to_b = TcpForwarder(sock_b.getsockname()[1], delay_s=ONE_WAY_DELAY_S)
    await to_a.start()
    await to_b.start()
    a = await start_instance("a", sock_a, [to_b.port])
    b = await start_instance("b", sock_b, [to_a.port])
    sessions = [(offset, f"s{n}-{offset}") for offset in FOLLOW_UP_OFFSETS_S for n in range(20)]

    async def conversation(offset: float, session: str) -> None:
        a.sync.store.pin(session, "up-a", now=time.time())  # the first answer, at a
        await asyncio.sleep(offset)
        seen = b.sync.store.get(session, now=time.time())  # the follow-up, at b
        pinned = seen.upstream if seen is not None else None
        served_by = pinned or "up-b"  # b honours a pin it sees, else picks its own
        if served_by != pinned:
            b.sync.store.pin(session, served_by, now=time.time(), moved_from=pinned)

    try:
        await eventually(lambda: all_connected(a, b))
        await asyncio.gather(*(conversation(offset, s) for offset, s in sessions))
        await eventually(
            lambda: all(upstream_of(i, s) == "up-a" for i in (a, b) for _, s in sessions)
        )
        # The 0 ms follow-ups at least did race the first pin (50 ms away), and lost.
        assert b.metric("skyroute_sync_pin_conflicts_total") >= 20
    finally:
        for inst in (a, b):
            await inst.stop()
        await to_a.aclose()
        await to_b.aclose()


async def test_StateSync_rotation_happens_in_band_without_a_reconnect() -> None:
    """Rotating keeps peer links open; writes on both sides around it converge in the new epoch.

    b is 50 ms away and still in the old epoch when a's first write after the rotation
    is made; b's own write lands in its old document and is carried by b's rebuild.
    """
    sock_a, sock_b = bound_socket(), bound_socket()
    to_a = TcpForwarder(sock_a.getsockname()[1], delay_s=ONE_WAY_DELAY_S)
    to_b = TcpForwarder(sock_b.getsockname()[1], delay_s=ONE_WAY_DELAY_S)
    await to_a.start()
    await to_b.start()
    a = await start_instance("a", sock_a, [to_b.port])
    b = await start_instance("b", sock_b, [to_a.port])
    try:
        await eventually(
            lambda: all_connected(a, b)
            and all(h.connections and all(c.rotates_in_band for c in h.connections)
                    for i in (a, b) for h in i.sync._hubs.values())
        )
        links = link_ids(a, b)
        a.sync.store.pin("before", "up-1", now=time.time())
        epoch = a.sync.epoch
        await a.sync.rotate()
        a.sync.store.pin("after-a", "up-a", now=time.time())
        b.sync.store.pin("after-b", "up-b", now=time.time())
        await eventually(
            lambda: all(
                i.sync.epoch == epoch + 1
                and upstream_of(i, "before") == "up-1"
                and upstream_of(i, "after-a") == "up-a"
                and upstream_of(i, "after-b") == "up-b"
                for i in (a, b)
            )
        )
        assert all_connected(a, b)
        assert links == link_ids(a, b)  # the same link objects: nobody reconnected
        assert b.metric("skyroute_sync_rotations_total") == 1
    finally:
        for inst in (a, b):
            await inst.stop()
        await to_a.aclose()
        await to_b.aclose()
