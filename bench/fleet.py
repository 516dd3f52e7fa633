"""Benchmark: a fleet of StateSync instances in one process, on loopback websockets.

Prints two things.

1. Messages per update in a full mesh of N = 3, 5, 8, 12, 20 instances: every
   instance lists every other, so each pair holds two links per document. A
   "message" is one SYNC_UPDATE frame sent by any instance; an "update" is one
   local write (pins, and the heartbeats and flushes that happen meanwhile).
   ``before`` runs the same mesh with the peers' link sets ignored (what a fleet of
   instances without the ``links`` frame does: relay to every peer but the sender),
   ``after`` is this code; the ideal is N-1.
2. The same writes through ``sync.relay`` (fleet mode, a Redis on ``--redis``) at
   N = 3, 5, 8, 12, 20, 50: messages each instance sends per update (1: one XADD to
   the engine, whatever N), entries read per update over the whole fleet (N: every
   instance reads each entry once, its own included), and bytes on the wire per
   update (sent + read), beside the mesh's for the same N (the mesh is not run at
   50: 4,900 links per document).
3. Partition detection and catch-up with the default settings (ping every 1 s,
   dead after 3 missed): two instances whose links run through ``TcpForwarder``s
   that black-hole the traffic without closing anything. It prints the time from
   the cut until no link shows ``connected`` (what ``/health`` and
   ``skyroute_sync_peers_connected`` show), and from the heal until a write made
   during the cut is visible on the other side.

Usage: python bench/fleet.py [--sizes 3,5,8,12,20] [--relay-sizes 3,5,8,12,20,50]
       [--redis redis://127.0.0.1:6379/0] [--pins 60] [--cuts 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import secrets
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import redis.asyncio as redis
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from skyroute.proxy.demo import TcpForwarder
from skyroute.statesync import StateSync, SyncSettings
from skyroute.statesync._doc import DocHub

TOKEN = "bench-token"


class Node:
    def __init__(self, name: str, sock: socket.socket, peers: list[int],
                 relay: tuple[str, str] | None = None) -> None:
        self.registry = CollectorRegistry()
        self.sock = sock
        self.sync = StateSync(
            SyncSettings(
                instance_id=name,
                token=TOKEN,
                peers=tuple(f"ws://127.0.0.1:{p}/sync" for p in peers),
                **({"relay_url": relay[0], "relay_prefix": relay[1]} if relay else {}),
            ),
            registry=self.registry,
        )
        self.runner: web.AppRunner | None = None
        self.writes = 0

    async def start(self) -> None:
        app = web.Application()
        self.sync.add_routes(app)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.SockSite(self.runner, self.sock, shutdown_timeout=1.0).start()
        await self.sync.start()
        for hub in self.sync._hubs.values():
            hub.doc.on_update(self._count)

    def _count(self, update: bytes, origin: object | None) -> None:
        if origin is None:
            self.writes += 1

    def updates_sent(self) -> float:
        labels = {"direction": "out", "type": "sync_update"}
        return self.registry.get_sample_value("skyroute_sync_messages_total", labels) or 0.0

    def sample(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels or None) or 0.0

    def is_connected(self) -> bool:
        """Every link connected (False as soon as one is not)."""
        return set(self.sync.peer_states().values()) == {"connected"}

    async def stop(self) -> None:
        await self.sync.aclose()
        if self.runner is not None:
            await self.runner.cleanup()
        self.sock.close()


def bound() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


async def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    started = time.perf_counter()
    while not predicate():
        if time.perf_counter() - started > timeout:
            raise SystemExit(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.005)
    return time.perf_counter() - started


async def pin_and_converge(nodes: list[Node], pins: int, *, timeout: float) -> None:
    """Pin ``pins`` sessions round-robin over ``nodes``; return once every node has the last."""
    for i in range(pins):
        nodes[i % len(nodes)].sync.store.pin(f"s{i}", f"up{i}", now=time.time())
        await asyncio.sleep(0.002)

    def seen_everywhere() -> bool:
        last = f"s{pins - 1}"
        return all(n.sync.store.get(last, now=time.time()) is not None for n in nodes)

    await wait_for(seen_everywhere, timeout, "convergence")


@contextlib.contextmanager
def links_ignored(ignore: bool) -> Iterator[None]:
    """Run with peers' link sets never recorded: the relay before this change."""
    original = DocHub.on_peer_links
    if ignore:
        DocHub.on_peer_links = lambda self, conn, links: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        DocHub.on_peer_links = original  # type: ignore[method-assign]


async def wire_per_update(size: int, pins: int, *, relay: str | None = None,
                          ignore_links: bool = False) -> dict[str, float]:
    """Per local write, over the whole fleet: updates sent, updates received, bytes
    (sent + received). With ``relay`` the fleet runs in fleet mode on that Redis."""
    socks = [bound() for _ in range(size)]
    ports = [s.getsockname()[1] for s in socks]
    prefix = f"bench-fleet:{secrets.token_hex(4)}:"
    nodes = [Node(f"n{i}", s, [] if relay else [p for p in ports if p != ports[i]],
                  (relay, prefix) if relay else None) for i, s in enumerate(socks)]

    def totals() -> tuple[float, float, float, int]:
        out = sum(n.sample("skyroute_sync_messages_total", direction="out",
                           type="sync_update") for n in nodes)
        into = sum(n.sample("skyroute_sync_messages_total", direction="in",
                            type="sync_update") for n in nodes)
        wire = sum(n.sample("skyroute_sync_bytes_total", direction=d)
                   for n in nodes for d in ("in", "out"))
        return out, into, wire, sum(n.writes for n in nodes)

    with links_ignored(ignore_links):
        try:
            for node in nodes:
                await node.start()

            def ready() -> bool:
                if relay:
                    return all(n.is_connected() for n in nodes)
                return all(n.is_connected() for n in nodes) and all(
                    len(h.linked_peers()) == size - 1
                    and (ignore_links or all(c.peer_links is not None for c in h.connections))
                    for n in nodes
                    for h in n.sync._hubs.values()
                )

            await wait_for(ready, 120.0, f"fleet of {size}")
            await asyncio.sleep(0.5)  # joins publish what the engine lacks: let it pass
            before = totals()
            await pin_and_converge(nodes, pins, timeout=60.0)
            if relay:
                # Count only once every write is published and every instance has read
                # every entry (its own included): 50 instances in one process fall behind
                # the writes, and a snapshot taken then shows queues, not the protocol.
                def drained() -> bool:
                    now = totals()
                    sent = now[0] - before[0]
                    return sent >= now[3] - before[3] and now[1] - before[1] >= size * sent
                await wait_for(drained, 120.0, "every entry read by every instance")
            else:
                await asyncio.sleep(0.2)  # let relays of the last writes drain
            after = totals()
            writes = after[3] - before[3]
            return {"sent": (after[0] - before[0]) / writes,
                    "received": (after[1] - before[1]) / writes,
                    "bytes": (after[2] - before[2]) / writes}
        finally:
            for node in nodes:
                await node.stop()
            if relay:
                client = redis.Redis.from_url(relay, socket_timeout=10.0)
                keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
                if keys:
                    await client.delete(*keys)
                await client.aclose()


async def messages_per_update(size: int, pins: int, *, ignore_links: bool) -> float:
    socks = [bound() for _ in range(size)]
    ports = [s.getsockname()[1] for s in socks]
    nodes = [Node(f"n{i}", s, [p for p in ports if p != ports[i]]) for i, s in enumerate(socks)]
    with links_ignored(ignore_links):
        try:
            for node in nodes:
                await node.start()

            def ready() -> bool:
                return all(n.is_connected() for n in nodes) and all(
                    len(h.linked_peers()) == size - 1
                    and (ignore_links or all(c.peer_links is not None for c in h.connections))
                    for n in nodes
                    for h in n.sync._hubs.values()
                )

            await wait_for(ready, 60.0, f"mesh of {size}")
            sent0 = sum(n.updates_sent() for n in nodes)
            writes0 = sum(n.writes for n in nodes)
            await pin_and_converge(nodes, pins, timeout=30.0)
            await asyncio.sleep(0.2)  # let relays of the last writes drain
            sent = sum(n.updates_sent() for n in nodes) - sent0
            writes = sum(n.writes for n in nodes) - writes0
            return sent / writes
        finally:
            for node in nodes:
                await node.stop()


async def partition_once() -> tuple[float, float]:
    sock_a, sock_b = bound(), bound()
    to_a, to_b = TcpForwarder(sock_a.getsockname()[1]), TcpForwarder(sock_b.getsockname()[1])
    await to_a.start()
    await to_b.start()
    a, b = Node("a", sock_a, [to_b.port]), Node("b", sock_b, [to_a.port])
    try:
        await a.start()
        await b.start()
        await wait_for(lambda: a.is_connected() and b.is_connected(), 10.0, "pair")
        to_a.black_hole()
        to_b.black_hole()
        seen = await wait_for(lambda: not (a.is_connected() or b.is_connected()), 30.0, "cut")
        a.sync.store.pin("during-cut", "up-a", now=time.time())
        await asyncio.sleep(1.0)  # a cut that lasts a while
        to_a.heal()
        to_b.heal()
        caught_up = await wait_for(
            lambda: b.sync.store.get("during-cut", now=time.time()) is not None, 30.0, "catch-up"
        )
        return seen, caught_up
    finally:
        for node in (a, b):
            await node.stop()
        await to_a.aclose()
        await to_b.aclose()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="3,5,8,12,20")
    parser.add_argument("--relay-sizes", default="3,5,8,12,20,50")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--pins", type=int, default=60)
    parser.add_argument("--cuts", type=int, default=3)
    args = parser.parse_args()
    print("messages per update, full mesh")
    print(f"{'N':>4} {'before':>8} {'after':>8} {'ideal N-1':>10}")
    for size in (int(s) for s in args.sizes.split(",")):
        before = await messages_per_update(size, args.pins, ignore_links=True)
        after = await messages_per_update(size, args.pins, ignore_links=False)
        print(f"{size:>4} {before:>8.2f} {after:>8.2f} {size - 1:>10}")
    print("fleet mode (sync.relay on Redis Streams) against the mesh, per update")
    print(f"{'N':>4} {'mesh sent':>10} {'relay sent':>11} {'relay read':>11} "
          f"{'mesh B':>9} {'relay B':>9} {'relay read/inst':>16}")
    for size in (int(s) for s in args.relay_sizes.split(",")):
        mesh = (await wire_per_update(size, args.pins)) if size <= 20 else None
        fleet = await wire_per_update(size, args.pins, relay=args.redis)
        mesh_sent = f"{mesh['sent']:.2f}" if mesh else "-"
        mesh_bytes = f"{mesh['bytes']:.0f}" if mesh else "-"
        print(f"{size:>4} {mesh_sent:>10} {fleet['sent']:>11.2f} {fleet['received']:>11.2f} "
              f"{mesh_bytes:>9} {fleet['bytes']:>9.0f} {fleet['received'] / size:>16.2f}")
    if not args.cuts:
        return
    seen, caught = [], []
    for _ in range(args.cuts):
        s, c = await partition_once()
        seen.append(s)
        caught.append(c)
    print(f"partition (ping 1 s, dead after 3), {args.cuts} cuts:")
    print(f"  cut seen after      max {max(seen):.2f} s  mean {statistics.mean(seen):.2f} s")
    print(f"  caught up after heal max {max(caught):.2f} s  mean {statistics.mean(caught):.2f} s")


if __name__ == "__main__":
    logging.disable(logging.CRITICAL)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    asyncio.run(main())
