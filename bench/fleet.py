"""Benchmark: a fleet of StateSync instances in one process, on loopback websockets.

Prints two things.

1. Messages per update in a full mesh of N = 3, 5, 8, 12, 20 instances: every
   instance lists every other, so each pair holds two links per document. A
   "message" is one SYNC_UPDATE frame sent by any instance; an "update" is one
   local write (pins, and the heartbeats and flushes that happen meanwhile).
   ``before`` runs the same mesh with the peers' link sets ignored (what a fleet of
   instances without the ``links`` frame does: relay to every peer but the sender),
   ``after`` is this code; the ideal is N-1.
2. Partition detection and catch-up with the default settings (ping every 1 s,
   dead after 3 missed): two instances whose links run through ``TcpForwarder``s
   that black-hole the traffic without closing anything. It prints the time from
   the cut until no link shows ``connected`` (what ``/health`` and
   ``skyroute_sync_peers_connected`` show), and from the heal until a write made
   during the cut is visible on the other side.

Usage: python bench/fleet.py [--sizes 3,5,8,12,20] [--pins 60] [--cuts 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from skyroute.proxy.demo import TcpForwarder
from skyroute.statesync import StateSync, SyncSettings
from skyroute.statesync._doc import DocHub

TOKEN = "bench-token"


class Node:
    def __init__(self, name: str, sock: socket.socket, peers: list[int]) -> None:
        self.registry = CollectorRegistry()
        self.sock = sock
        self.sync = StateSync(
            SyncSettings(
                instance_id=name,
                token=TOKEN,
                peers=tuple(f"ws://127.0.0.1:{p}/sync" for p in peers),
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
            for i in range(pins):
                nodes[i % size].sync.store.pin(f"s{i}", f"up{i}", now=time.time())
                await asyncio.sleep(0.002)

            def seen_everywhere() -> bool:
                last = f"s{pins - 1}"
                return all(n.sync.store.get(last, now=time.time()) is not None for n in nodes)

            await wait_for(seen_everywhere, 30.0, "convergence")
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
    parser.add_argument("--pins", type=int, default=60)
    parser.add_argument("--cuts", type=int, default=3)
    args = parser.parse_args()
    print("messages per update, full mesh")
    print(f"{'N':>4} {'before':>8} {'after':>8} {'ideal N-1':>10}")
    for size in (int(s) for s in args.sizes.split(",")):
        before = await messages_per_update(size, args.pins, ignore_links=True)
        after = await messages_per_update(size, args.pins, ignore_links=False)
        print(f"{size:>4} {before:>8.2f} {after:>8.2f} {size - 1:>10}")
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
