"""Benchmark: costs of the synced session documents as live sessions grow 1 -> 100,000.

One instance (``StateSync``, serving ``/sync/{doc}`` on 127.0.0.1) is filled with pinned
sessions as the proxy writes them (``SessionStore.pin``), growing 1 -> 100 -> 1,000 ->
10,000 -> 100,000 (the sessions of one size stay for the next). At each size it prints:

* memory: this process's RSS growth per session over the empty instance (pycrdt's
  memory is Rust's, so RSS, not tracemalloc), and the encoded ``sessions`` document's
  bytes per session;
* write cost: CPU microseconds per ``pin`` of a new session, per move of an existing one
  (a pin with ``moved_from``), per ``get``, and per idle ``flush`` (the 50 ms loop);
* what grows with the document by design, done once per interval, not per request:
  CPU milliseconds to encode it (``document_sizes``, for the size metric, every 5 s) and to
  rebuild it for the next epoch (``rebuild``, what a rotation does, hourly);
* catch-up: a new instance (a fresh process, ``--join``) starts with this one as its
  peer; the wall time from its ``start()`` until it holds the last session written, its
  CPU per session meanwhile, and its RSS then (it holds no state of its own); and the CPU
  this instance spent meanwhile (serving it).

Costs are CPU time (``time.process_time``): other work shares this machine.

Each figure comes with its ratio to the smallest size, measured in this run. Goals
(issue 14): per-session memory, write cost and catch-up time per session flat (no
cost that grows faster than the number of sessions).

Usage: python bench/sessions.py [--sizes 1 100 1000 10000 100000] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry
from skyroute.statesync import StateSync, SyncSettings
from skyroute.statesync._doc import rebuild

HERE = Path(__file__).resolve().parent
TOKEN = "bench-sessions"
SAMPLES = 1000
"""Operations timed at each size (the new pins among them are the last sessions in)."""
JOIN_TIMEOUT_S = 300.0


def rss_kib(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def session_id(i: int) -> str:
    return f"sess-{i:08d}-{'x' * 12}"  # the length of a typical client-chosen id


def per_op_us(fn: object, items: list[str]) -> float:
    """CPU microseconds per call (CPU, not wall: other work shares this machine)."""
    t0 = time.process_time()
    for item in items:
        fn(item)  # type: ignore[operator]
    return (time.process_time() - t0) / len(items) * 1e6


async def join(url: str, last: str) -> None:
    """The new instance: start with ``url`` as its peer, report when ``last`` arrived."""
    sync = StateSync(SyncSettings(instance_id="joiner", token=TOKEN, peers=(url,)),
                     registry=CollectorRegistry())
    t0, cpu0 = time.perf_counter(), time.process_time()
    await sync.start()
    deadline = t0 + JOIN_TIMEOUT_S
    while sync.store.get(last, now=time.time()) is None:
        if time.perf_counter() > deadline:
            raise SystemExit(f"{last} did not arrive in {JOIN_TIMEOUT_S} s")
        await asyncio.sleep(0.002)
    took, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    print(json.dumps({"seconds": took, "cpu_s": cpu, "rss_kib": rss_kib()}), flush=True)
    await sync.aclose()


async def measure_join(url: str, last: str) -> tuple[float, float, int]:
    """Run the joining instance in its own process (this one keeps serving it)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(Path(__file__).resolve()), "--join", url, "--last", last,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    async with asyncio.timeout(JOIN_TIMEOUT_S + 30):
        stdout, stderr = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"the joining instance failed:\n{stderr.decode()[-2000:]}")
    result = json.loads(stdout.decode().strip().splitlines()[-1])
    return float(result["seconds"]), float(result["cpu_s"]), int(result["rss_kib"])


async def run(sizes: list[int]) -> list[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sync = StateSync(SyncSettings(instance_id="full", token=TOKEN), registry=CollectorRegistry())
    app = web.Application()
    sync.add_routes(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    await sync.start()
    store = sync.store
    url = f"ws://127.0.0.1:{port}/sync"
    gc.collect()
    empty = rss_kib()
    written = 0
    rows: list[tuple[int, ...] | tuple[float, ...]] = []
    out = [f"{'sessions':>9} {'RSS MiB':>8} {'B/session':>10} {'doc B/sess':>10} "
           f"{'pin new us':>10} {'move us':>8} {'get us':>7} {'flush us':>9} {'size ms':>8} "
           f"{'rebuild ms':>10} "
           f"{'catch-up s':>10} {'CPU us/ses':>10} {'joiner MiB':>10} {'served ms':>9}"]
    try:
        for n in sizes:
            samples = min(SAMPLES, n)
            now = time.time()
            for i in range(written, n - samples):  # fill up to just below n
                store.pin(session_id(i), f"up{i % 7}", now=now)
            new = [session_id(i) for i in range(n - samples, n)]
            pin_us = per_op_us(lambda s, now=now: store.pin(s, "up0", now=now), new)
            written = n
            moved = [session_id(i) for i in range(0, n, max(1, n // samples))][:samples]
            move_us = per_op_us(
                lambda s, now=now: store.pin(s, "up1", now=now, moved_from="up0"), moved)
            get_us = per_op_us(lambda s, now=now: store.get(s, now=now), moved)
            flushes = [""] * 20
            store.flush()
            flush_us = per_op_us(lambda _: store.flush(), flushes)
            await asyncio.sleep(0.1)  # let the event loop run what the writes queued
            gc.collect()
            rss = rss_kib()
            t0 = time.process_time()
            doc_bytes = sync.document_sizes()["sessions"]
            size_ms = (time.process_time() - t0) * 1e3
            hub = sync._hubs["sessions"]
            t0 = time.process_time()
            rebuild(hub.doc, hub.doc.epoch + 1, store.keep)  # built, not installed
            rebuild_ms = (time.process_time() - t0) * 1e3
            cpu0 = time.process_time()
            join_s, join_cpu, join_rss = await measure_join(url, new[-1])
            served_ms = (time.process_time() - cpu0) * 1e3  # this instance, serving it
            rows.append((n, rss, (rss - empty) * 1024 / n, doc_bytes / n, pin_us, move_us,
                         get_us, flush_us, join_s, join_cpu / n * 1e6, join_rss, size_ms,
                         rebuild_ms, served_ms))
            r = rows[-1]
            out.append(f"{n:>9} {rss / 1024:>8.1f} {r[2]:>10.0f} {r[3]:>10.0f} {pin_us:>10.1f} "
                       f"{move_us:>8.1f} {get_us:>7.1f} {flush_us:>9.1f} {size_ms:>8.1f} "
                       f"{rebuild_ms:>10.1f} {join_s:>10.3f} {r[9]:>10.1f} "
                       f"{join_rss / 1024:>10.1f} {served_ms:>9.0f}")
            print(out[-1], file=sys.stderr, flush=True)
    finally:
        await sync.aclose()
        await runner.cleanup()
        sock.close()
    first, last = rows[0], rows[-1]
    out.append(f"ratios {last[0]} sessions / {first[0]}: pin {last[4] / first[4]:.2f}x, "
               f"move {last[5] / first[5]:.2f}x, get {last[6] / first[6]:.2f}x, "
               f"flush {last[7] / first[7]:.2f}x")
    if len(rows) > 2:
        mid = rows[-2]
        out.append(f"ratios {last[0]} / {mid[0]} sessions: memory per session "
                   f"{last[2] / mid[2]:.2f}x, document bytes per session {last[3] / mid[3]:.2f}x, "
                   f"rebuild per session {last[12] / mid[12] * mid[0] / last[0]:.2f}x, "
                   f"catch-up CPU per session {last[9] / mid[9]:.2f}x, catch-up time per "
                   f"session {last[8] / mid[8] * mid[0] / last[0]:.2f}x")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 100, 1000, 10_000, 100_000])
    ap.add_argument("--quick", action="store_true", help="sizes up to 10,000")
    ap.add_argument("--join", metavar="URL", help=argparse.SUPPRESS)  # the joining process
    ap.add_argument("--last", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.join:
        asyncio.run(join(args.join, args.last))
        return 0
    sizes = [s for s in args.sizes if s <= 10_000] if args.quick else args.sizes
    print("\n".join(asyncio.run(run(sorted(sizes)))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
