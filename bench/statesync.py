"""Benchmark: three StateSync instances on loopback, 200 session updates/s.

Prints, for a run without rotation and a run with rotation:
* p50/p99 time from a ``pin`` on one instance until both other instances have it,
* CPU per update (process CPU time / updates; all three instances share this
  process, so it is the whole cluster's cost of one update: one write, two applies,
  the relays and the heartbeats),
* document size over time (sessions + usage docs on instance s1),
* with rotation: the p99 of writes made within 0.3 s of a rotation against the rest of
  the same run, and their ratio (issue 18's goal: at most 2).

``--delay-ms`` puts a one-way delay line (``TcpForwarder``) on every link, a WAN on
one machine.

Traffic: every update pins a session on a round-robin instance; half are new
sessions, half re-pin a recent one, and every update also counts usage for a client
key (batched by the flush loop). Sessions idle past the TTL (set to the rotation
period) are dropped only by rotation, so without rotation the documents grow and
with it they stay bounded.

Usage: python bench/statesync.py [--seconds 60] [--rate 200] [--delay-ms 0] [--rotate-every S]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from skyroute.proxy.demo import TcpForwarder
from skyroute.statesync import StateSync, SyncSettings
from skyroute.statesync._doc import DocHub, EpochDoc

TOKEN = "bench-token"
NEAR_ROTATION_S = 0.3
"""Writes this close to a rotation (before or after) are reported apart."""


FORWARDERS: list[TcpForwarder] = []


async def peer_port(port: int, delay_s: float) -> int:
    """``port`` itself, or a delay line in front of it when ``delay_s`` > 0."""
    if delay_s <= 0:
        return port
    line = TcpForwarder(port, delay_s=delay_s)
    await line.start()
    FORWARDERS.append(line)
    return line.port


async def start_cluster(
    rotate_every_s: float, ttl_s: float, delay_s: float = 0.0
) -> list[tuple[StateSync, Any, Any]]:
    socks = []
    for _ in range(3):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        socks.append(sock)
    ports = [s.getsockname()[1] for s in socks]
    out = []
    for i, sock in enumerate(socks):
        peers = [await peer_port(p, delay_s) for p in ports if p != ports[i]]
        sync = StateSync(
            SyncSettings(
                instance_id=f"s{i + 1}",
                token=TOKEN,
                rotate_every_s=rotate_every_s,
                session_ttl_s=ttl_s,
                peers=tuple(f"ws://127.0.0.1:{p}/sync" for p in peers),
            ),
            registry=CollectorRegistry(),
        )
        app = web.Application()
        sync.add_routes(app)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        await sync.start()
        out.append((sync, runner, sock))
    deadline = time.monotonic() + 10
    while not all(set(s.peer_states().values()) == {"connected"} for s, _, _ in out):
        if time.monotonic() > deadline:
            raise SystemExit("cluster did not connect within 10 s")
        await asyncio.sleep(0.01)
    return out


class Watcher:
    """Records when each pinned session id becomes visible on the other instances."""

    def __init__(self, syncs: list[StateSync]) -> None:
        self.pending: dict[str, tuple[float, set[int]]] = {}
        self.latencies: list[float] = []
        self.samples: list[tuple[float, float]] = []  # (written at, latency)
        self.rotations: list[float] = []
        first = syncs[0]._hubs["sessions"]
        first.on_new_doc(lambda doc: self.rotations.append(time.perf_counter()))
        for index, sync in enumerate(syncs):
            hub = sync._hubs["sessions"]
            self._watch(hub, hub.doc, index)
            hub.on_new_doc(lambda doc, i=index, h=hub: self._watch(h, doc, i))

    def _watch(self, hub: DocHub, doc: EpochDoc, index: int) -> None:
        def on_change(map_name: str, keys: dict[str, Any], remote: bool) -> None:
            # Only the current document counts (what reads see), local writes too: a peer
            # writes a write that was in flight at a rotation into its new document itself.
            # The writer's own write is not waited for (``expect``).
            if map_name != "sessions" or doc is not hub.doc:
                return
            now = time.perf_counter()
            for key, change in keys.items():
                value = change.get("newValue")
                tag = value.get("attributes", {}).get("n") if isinstance(value, dict) else None
                entry = self.pending.get(f"{key}#{tag}")
                if entry is None:
                    continue
                entry[1].discard(index)
                if not entry[1]:
                    self.latencies.append(now - entry[0])
                    self.samples.append((entry[0], now - entry[0]))
                    del self.pending[f"{key}#{tag}"]

        doc.on_map_change(on_change)

    def expect(self, key: str, tag: int, writer: int) -> None:
        self.pending[f"{key}#{tag}"] = (time.perf_counter(), {0, 1, 2} - {writer})


def p99_ms(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return ordered[max(0, int(len(ordered) * 0.99) - 1)] * 1000 if ordered else float("nan")


async def run(
    seconds: float, rate: float, rotate_every_s: float | None, delay_s: float = 0.0
) -> dict[str, Any]:
    period = rotate_every_s or 1e9
    ttl = rotate_every_s or seconds / 4
    cluster = await start_cluster(period, ttl, delay_s)
    syncs = [c[0] for c in cluster]
    watcher = Watcher(syncs)
    sizes: list[tuple[float, int]] = []
    recent: list[str] = []
    rng = random.Random(1)
    interval = 1.0 / rate
    started = time.monotonic()
    cpu0 = time.process_time()
    n = 0
    next_sample = 0.0
    next_at = started
    while (elapsed := time.monotonic() - started) < seconds:
        if elapsed >= next_sample:
            sizes.append((elapsed, sum(syncs[0].document_sizes().values())))
            next_sample += seconds / 10
        writer = n % 3
        store = syncs[writer].store
        now = time.time()
        if recent and rng.random() < 0.5:
            key = rng.choice(recent[-500:])
        else:
            key = f"sess-{n}"
            recent.append(key)
        watcher.expect(key, n, writer)
        seen = store.get(key, now=now)  # a re-pin is a move from the pin this instance sees
        store.pin(key, f"upstream-{n % 7}", now=now, attributes={"n": str(n)},  # n: the tag
                  moved_from=seen.upstream if seen is not None else None)
        store.add_usage("team-a", requests=1, tokens=100, now=now)
        n += 1
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    deadline = time.monotonic() + 5
    while watcher.pending and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    cpu = time.process_time() - cpu0
    await asyncio.sleep(0.3)  # let the last counter flush (every 50 ms) reach the peers
    sizes.append((time.monotonic() - started, sum(syncs[0].document_sizes().values())))
    usage = [s.store.usage("team-a", now=time.time()).requests for s in syncs]
    views = [dict(s._hubs["sessions"].doc.maps["sessions"].items()) for s in syncs]
    diverged = sum(1 for k in views[0] if not views[0][k] == views[1].get(k) == views[2].get(k))
    for sync, runner, sock in cluster:
        await sync.aclose()
        await runner.cleanup()
        sock.close()
    for line in FORWARDERS:
        await line.aclose()
    FORWARDERS.clear()
    near = [
        lat for at, lat in watcher.samples
        if any(abs(at - rotated) <= NEAR_ROTATION_S for rotated in watcher.rotations)
    ]
    far = [
        lat for at, lat in watcher.samples
        if all(abs(at - rotated) > NEAR_ROTATION_S for rotated in watcher.rotations)
    ]
    lat = sorted(watcher.latencies)
    return {
        "updates": n,
        "seen": len(lat),
        "lost": len(watcher.pending),
        "p50_ms": statistics.median(lat) * 1000 if lat else float("nan"),
        "p99_ms": lat[int(len(lat) * 0.99) - 1] * 1000 if lat else float("nan"),
        "cpu_us": cpu / max(n, 1) * 1e6,
        "sizes": sizes,
        "usage": usage,
        "epochs": syncs[0].epoch,
        "diverged": diverged,
        "near_rotation": (len(near), p99_ms(near), len(far), p99_ms(far)),
    }


def report(title: str, r: dict[str, Any]) -> None:
    print(f"\n== {title}")
    print(
        f"updates sent {r['updates']}, seen by both peers {r['seen']}, "
        f"superseded by a newer write of the same session before seen {r['lost']}"
    )
    print(f"time until all peers see an update: p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms")
    near_n, near_p99, far_n, far_p99 = r["near_rotation"]
    if near_n:
        print(
            f"p99 for writes within {NEAR_ROTATION_S} s of a rotation: {near_p99:.2f} ms "
            f"({near_n} writes); the others: {far_p99:.2f} ms ({far_n}); "
            f"ratio near/others {near_p99 / far_p99:.2f} (goal: at most 2)"
        )
    print(f"CPU per update (whole 3-instance cluster): {r['cpu_us']:.0f} us")
    print(f"sessions differing between instances at the end: {r['diverged']}")
    print(f"usage counter (last 60 s) on s1/s2/s3: {r['usage']}")
    print("document size on s1 (sessions + usage docs):")
    for at, size in r["sizes"]:
        print(f"  t={at:6.1f} s  {size / 1024:8.1f} KiB")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="duration of each run")
    parser.add_argument("--rate", type=float, default=200.0, help="session updates per second")
    parser.add_argument("--delay-ms", type=float, default=0.0,
                        help="one-way delay on every link (a TcpForwarder delay line)")
    parser.add_argument("--rotate-every", type=float, default=None,
                        help="rotation period and TTL in seconds (default: a quarter of "
                        "--seconds); more rotations give the near-rotation p99 more writes")
    args = parser.parse_args()
    delay = args.delay_ms / 1000
    logging.disable(logging.CRITICAL)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    rotate = args.rotate_every or args.seconds / 4
    print(f"3 instances on loopback, {args.rate:.0f} updates/s, {args.seconds:.0f} s per run, "
          f"{args.delay_ms:g} ms one-way delay")
    report("without rotation (sessions never dropped)",
           await run(args.seconds, args.rate, None, delay))
    report(
        f"with rotation every {rotate:.1f} s (TTL {rotate:.1f} s)",
        await run(args.seconds, args.rate, rotate, delay),
    )


if __name__ == "__main__":
    asyncio.run(main())
