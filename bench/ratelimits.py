"""Benchmark: one key's ``rpm`` across three instances far apart, with and without shares.

Three instances in one process, each a real ``StateSync`` (peered in a full mesh)
with the proxy's own limit path (``enforce_limits`` and the ``SharedLimits`` tick
loop), joined by one-way delay lines (``TcpForwarder``) per pair: by default 40 ms
between s1 and s2, 150 ms between s1 and s3, 122 ms between s2 and s3. A driver
sends ``--rate`` requests per second in total (round robin over the instances, so
each sees a third) for a key with ``rpm: --rpm``, for ``--seconds``.

Two runs in the same process, same traffic:
* ``global count only``: what skyroute did before shares (every instance admits
  while the key's count over all instances, as far as it has heard, is under rpm);
* ``shares``: each instance also keeps to its share of the rpm (``routing.LimitShares``).

Printed per run: the most requests admitted in any sliding 60 s window (the limit
says at most rpm), and the admissions per second around the moments the first ones
leave the window (t = 0 and one and two windows later), per instance: a synchronised
burst is all three admitting in the same second past their part. ``--delay-scale``
multiplies every delay (0 gives loopback), so runs at several scales show whether the
error grows with distance. ``--traffic shift`` sends everything to s1 for the first half
and to s3 (the farthest from s1) for the second: the shares must follow the traffic.
``--short`` runs at most 20 s (CI: it shows the first window only).

Usage: python bench/ratelimits.py [--seconds 130] [--rate 150] [--rpm 60]
                                  [--delay-scale 1.0] [--traffic even|shift] [--short]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from skyroute.proxy._errors import RateLimitExceeded
from skyroute.proxy._limit_shares import SHARE_TICK_S, SharedLimits
from skyroute.proxy._metrics import Metrics
from skyroute.proxy._sessions import enforce_limits
from skyroute.proxy.demo import TcpForwarder
from skyroute.routing import ApiKey
from skyroute.statesync import StateSync, SyncSettings

TOKEN = "bench-token"
PAIR_DELAYS_MS = {(0, 1): 40.0, (0, 2): 150.0, (1, 2): 122.0}
"""One-way delay per pair of instances (both directions)."""
WINDOW_S = 60.0


class Instance:
    """One instance: its StateSync, its shares (or None: global count only), its server."""

    def __init__(self, sync: StateSync, runner: web.AppRunner, shares: SharedLimits | None):
        self.sync = sync
        self.runner = runner
        self.shares = shares
        self.metrics = Metrics(instance=sync.settings.instance_id)
        self.admitted: list[float] = []
        self.task: asyncio.Task[None] | None = None

    def handle(self, client: ApiKey, now: float) -> bool:
        try:
            enforce_limits(self.sync.store, client, self.metrics, now=now, shares=self.shares)
        except RateLimitExceeded:
            return False
        self.admitted.append(now)
        return True

    async def tick(self, client: ApiKey) -> None:
        while self.shares is not None:
            await asyncio.sleep(SHARE_TICK_S)
            self.shares.tick(self.sync.store, {client.name: client}, self.metrics,
                             now=time.time())


async def start(scale: float, with_shares: bool, client: ApiKey) -> tuple[list[Instance], list]:
    socks = []
    for _ in range(3):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        socks.append(sock)
    ports = [s.getsockname()[1] for s in socks]
    lines: list[TcpForwarder] = []
    instances = []
    for i, sock in enumerate(socks):
        peers = []
        for j, port in enumerate(ports):
            if j == i:
                continue
            delay = PAIR_DELAYS_MS[(min(i, j), max(i, j))] * scale / 1000
            line = TcpForwarder(port, delay_s=delay)
            await line.start()
            lines.append(line)
            peers.append(f"ws://127.0.0.1:{line.port}/sync")
        sync = StateSync(SyncSettings(instance_id=f"s{i + 1}", token=TOKEN, peers=tuple(peers)),
                         registry=CollectorRegistry())
        app = web.Application()
        sync.add_routes(app)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        await sync.start()
        shares = SharedLimits(sync.store) if with_shares else None
        instance = Instance(sync, runner, shares)
        instance.task = asyncio.create_task(instance.tick(client))
        instances.append(instance)
    deadline = time.monotonic() + 20
    # Every instance connected and heard from both others (shares count them in).
    while not all(set(x.sync.peer_states().values()) == {"connected"}
                  and len([w for w, at in x.sync.store.heard_from().items()
                           if time.time() - at < 2]) >= 2 for x in instances):
        if time.monotonic() > deadline:
            raise SystemExit("cluster did not connect within 20 s")
        await asyncio.sleep(0.05)
    if with_shares:
        for x in instances:
            assert x.shares is not None
            x.shares.refresh(x.sync.store, now=time.time())
    return instances, lines


async def stop(instances: list[Instance], lines: list[TcpForwarder]) -> None:
    for x in instances:
        if x.task is not None:
            x.task.cancel()
        await x.sync.aclose()
        await x.runner.cleanup()
    for line in lines:
        await line.aclose()


def max_in_window(times: list[float]) -> tuple[int, float]:
    """The most events in any half-open window of WINDOW_S, and where it starts."""
    times = sorted(times)
    best, at, lo = 0, 0.0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - WINDOW_S:
            lo += 1
        if hi - lo + 1 > best:
            best, at = hi - lo + 1, times[lo]
    return best, at


async def run(seconds: float, rate: float, rpm: int, scale: float, with_shares: bool,
              traffic: str = "even") -> dict[str, Any]:
    client = ApiKey(name="team", key="sk-bench", rpm=rpm)
    instances, lines = await start(scale, with_shares, client)
    interval = 1.0 / rate
    started = time.time()
    next_at = time.monotonic()
    sent = 0
    while time.time() - started < seconds:
        now = time.time()
        at = sent % 3 if traffic == "even" else 0 if now - started < seconds / 2 else 2
        instances[at].handle(client, now)
        sent += 1
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    cpu = time.process_time()
    await stop(instances, lines)
    per_instance = [[t - started for t in x.admitted] for x in instances]
    everything = sorted(t for times in per_instance for t in times)
    best, at = max_in_window(everything)
    return {"sent": sent, "admitted": len(everything), "max_window": best, "max_at": at,
            "per_instance": per_instance, "cpu": cpu}


def timeline(per_instance: list[list[float]], seconds: float) -> list[str]:
    """Admissions per second (s1/s2/s3) in the seconds that admitted anything."""
    bins = [Counter(int(t) for t in times) for times in per_instance]
    busy = sorted(set().union(*bins))
    out = []
    for second in busy:
        counts = [b.get(second, 0) for b in bins]
        out.append(f"    t={second:4d}-{second + 1:<4d}s  {sum(counts):3d} admitted  "
                   f"(s1/s2/s3 {counts[0]}/{counts[1]}/{counts[2]})")
    return out


def report(title: str, r: dict[str, Any], rpm: int, seconds: float) -> None:
    print(f"\n== {title}")
    print(f"sent {r['sent']}, admitted {r['admitted']}; most admitted in any 60 s window: "
          f"{r['max_window']} (rpm {rpm}; window from t={r['max_at']:.1f} s)")
    print("  admissions per second (only seconds that admitted any):")
    lines = timeline(r["per_instance"], seconds)
    for line in lines[:40]:
        print(line)
    if len(lines) > 40:
        print(f"    ... {len(lines) - 40} more seconds")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=130.0, help="duration of each run")
    parser.add_argument("--rate", type=float, default=150.0, help="requests per second in total")
    parser.add_argument("--rpm", type=int, default=60, help="the key's rpm")
    parser.add_argument("--delay-scale", type=float, default=1.0,
                        help="multiplies the per-pair delays (40/150/122 ms one-way)")
    parser.add_argument("--traffic", choices=("even", "shift"), default="even",
                        help="even: a third at each; shift: all at s1, then all at s3")
    parser.add_argument("--short", action="store_true", help="20 s runs (the first window only)")
    args = parser.parse_args()
    seconds = min(20.0, args.seconds) if args.short else args.seconds
    logging.disable(logging.CRITICAL)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    delays = ", ".join(f"s{a + 1}-s{b + 1} {d * args.delay_scale:g} ms"
                       for (a, b), d in PAIR_DELAYS_MS.items())
    spread = ("a third each" if args.traffic == "even"
              else f"all at s1 until t={seconds / 2:g} s, then all at s3")
    print(f"3 instances, one-way delays {delays}; {args.rate:g} req/s in total ({spread}) "
          f"for {seconds:g} s; rpm {args.rpm}")
    baseline = await run(seconds, args.rate, args.rpm, args.delay_scale, False, args.traffic)
    report("global count only (before shares)", baseline, args.rpm, seconds)
    shares = await run(seconds, args.rate, args.rpm, args.delay_scale, True, args.traffic)
    report("shares (routing.LimitShares)", shares, args.rpm, seconds)
    print(f"\nmost admitted in any 60 s window: {baseline['max_window']} before, "
          f"{shares['max_window']} with shares (rpm {args.rpm}: "
          f"{baseline['max_window'] / args.rpm:.2f}x and {shares['max_window'] / args.rpm:.2f}x)")


if __name__ == "__main__":
    asyncio.run(main())
