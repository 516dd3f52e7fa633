"""Benchmark: the seed's hybrid-cloud scenario, round-robin vs lowest-latency routing.

Three stand-in regions answer their first token in 40, 60 and 80 ms. Part-way
through, the fastest (eu-west) degrades to 400 ms, past the 200 ms threshold,
and later recovers. The same open-loop request stream (fixed arrival times,
non-streaming chat completions, each answered by one of the regions) goes
through skyroute twice:

* **baseline (round-robin)**: ``strategy: weighted`` with equal weights, and a
  60 s ``latency_threshold`` so nothing is ever "slow": every region keeps a
  third of the traffic whatever its latency, which is what a round-robin
  balancer does. skyroute has no separate round-robin strategy; this is it.
* **lowest-latency**: ``strategy: lowest-latency`` with the 200 ms threshold,
  passive latency (skyroute's own time-to-first-token p95) evaluated every
  250 ms, recovery after 3 intervals under 160 ms and a 3 s ramp back.

Printed per run: mean and p95 client latency (whole request, measured by the
client), the share of requests the degraded region served while degraded,
the time from the degradation until 95 % of traffic had moved away from it
(the first moment after which, over the next second of arrivals, at most 5 %
went there), and, for skyroute, the change of the mean against the baseline
measured in the same run (the seed document claims -41 %).

Usage: python bench/latency_routing.py [--seconds 25] [--rate 40]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from skyroute.proxy import Server
from skyroute.proxy._logging import configure_logging
from skyroute.proxy.demo import StandinUpstream
from skyroute.routing import parse_config

REGIONS = {"eu-west": 0.040, "us-east": 0.060, "ap-south": 0.080}
DEGRADED, DEGRADED_TTFT_S = "eu-west", 0.400
KEY = "sk-bench"

LATENCY = """\
latency:
  interval: 250ms
  passive_window: 3s
  recover_intervals: 3
  ramp: 3s
  probe_share: 2%
"""
ROUND_ROBIN = "strategy: weighted\n    latency_threshold: 60s\n"
LOWEST = "strategy: lowest-latency\n    latency_threshold: 200ms\n"


@dataclass(slots=True)
class Sample:
    at: float  # seconds since the stream started (scheduled arrival)
    latency_s: float
    region: str


def routing_file(ups: dict[str, StandinUpstream], strategy: str) -> str:
    upstreams = "".join(
        f"  - name: {name}\n    url: {up.base_url}\n    api_key: {KEY}\n    region: {name}\n"
        f"    models: {{chat: deepseek-chat}}\n" for name, up in ups.items())
    auth = f"auth:\n  api_keys:\n    - name: bench\n      key: {KEY}\n"
    return (f"listen: 127.0.0.1:0\n{auth}{LATENCY}upstreams:\n{upstreams}routes:\n"
            f"  - model: chat\n    targets: [{', '.join(ups)}]\n    {strategy}")


async def one(session: aiohttp.ClientSession, url: str, at: float, out: list[Sample]) -> None:
    t0 = time.perf_counter()
    async with session.post(url, json={"model": "chat", "messages": [
            {"role": "user", "content": "hi"}]}) as resp:
        body: dict[str, Any] = await resp.json()
    latency = time.perf_counter() - t0
    region = body["choices"][0]["message"]["content"].split()[2]
    out.append(Sample(at=at, latency_s=latency, region=region))


async def run(ups: dict[str, StandinUpstream], strategy: str, *, seconds: float, rate: float,
              degrade: tuple[float, float]) -> list[Sample]:
    for name, up in ups.items():
        up.behaviour.ttft_s = REGIONS[name]
    server = Server(parse_config(routing_file(ups, strategy), env={}), port=0, grace_s=1.0)
    await server.start()
    samples: list[Sample] = []
    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=0)
    try:
        async with aiohttp.ClientSession(timeout=timeout, connector=connector,
                                         headers={"Authorization": f"Bearer {KEY}"}) as session:
            url = f"{server.url}/v1/chat/completions"
            for _ in range(20):  # warm-up: connections, and a first estimate per region
                await one(session, url, -1.0, [])
            tasks = []
            started = time.perf_counter()
            n = int(seconds * rate)
            degraded = recovered = False
            for i in range(n):
                at = i / rate
                delay = started + at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if not degraded and at >= degrade[0]:
                    ups[DEGRADED].behaviour.ttft_s, degraded = DEGRADED_TTFT_S, True
                if not recovered and at >= degrade[1]:
                    ups[DEGRADED].behaviour.ttft_s, recovered = REGIONS[DEGRADED], True
                tasks.append(asyncio.create_task(one(session, url, at, samples)))
            await asyncio.gather(*tasks)
    finally:
        await server.aclose()
    return sorted(samples, key=lambda s: s.at)


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(0.95 * len(ordered) + 0.5) - 1)]


def time_to_move(samples: list[Sample], start: float, end: float, *,
                 window: float = 1.0, step: float = 0.05) -> float | None:
    """Seconds from ``start`` until, over the next ``window`` of arrivals, <= 5 % hit DEGRADED."""
    t = start
    while t + window <= end:
        inside = [s for s in samples if t <= s.at < t + window]
        if inside and sum(s.region == DEGRADED for s in inside) <= 0.05 * len(inside):
            return t - start
        t += step
    return None


def share(samples: list[Sample], start: float, end: float) -> float:
    inside = [s for s in samples if start <= s.at < end]
    return sum(s.region == DEGRADED for s in inside) / max(1, len(inside))


def report(name: str, samples: list[Sample], degrade: tuple[float, float],
           baseline_mean: float | None) -> float:
    latencies = [s.latency_s for s in samples]
    mean = statistics.fmean(latencies)
    moved = time_to_move(samples, *degrade)
    during = [s.latency_s for s in samples if degrade[0] <= s.at < degrade[1]]
    print(f"{name:<26} requests {len(samples):5d}  mean {mean * 1000:6.1f} ms  "
          f"p95 {p95(latencies) * 1000:6.1f} ms  | while degraded: mean "
          f"{statistics.fmean(during) * 1000:6.1f} ms, p95 {p95(during) * 1000:6.1f} ms, "
          f"{DEGRADED} share {share(samples, *degrade):5.1%}")
    moved_text = "never" if moved is None else f"{moved:.2f} s"
    after = share(samples, degrade[1] + 8.0, degrade[1] + 10.0) \
        if samples[-1].at >= degrade[1] + 10.0 else None
    back = "" if after is None else f"; {DEGRADED} share 8-10 s after recovery {after:.1%}"
    print(f"{'':<26} time from degradation to 95 % of traffic moved: {moved_text}{back}")
    if baseline_mean is not None:
        change = (mean - baseline_mean) / baseline_mean
        print(f"{'':<26} mean latency vs round-robin: {change:+.1%} "
              "(the seed document claims -41 %)")
    return mean


async def main(seconds: float, rate: float) -> None:
    degrade = (seconds * 0.2, seconds * 0.55)
    ups = {name: StandinUpstream(name, api_key=KEY) for name in REGIONS}
    for up in ups.values():
        await up.start()
    try:
        print(f"regions (TTFT): {', '.join(f'{n} {s * 1000:.0f} ms' for n, s in REGIONS.items())};"
              f" {DEGRADED} at {DEGRADED_TTFT_S * 1000:.0f} ms from t={degrade[0]:.0f} s to "
              f"t={degrade[1]:.0f} s; {rate:g} requests/s for {seconds:g} s per run")
        base = await run(ups, ROUND_ROBIN, seconds=seconds, rate=rate, degrade=degrade)
        smart = await run(ups, LOWEST, seconds=seconds, rate=rate, degrade=degrade)
    finally:
        for up in ups.values():
            await up.aclose()
    baseline_mean = report("round-robin (baseline)", base, degrade, None)
    report("skyroute lowest-latency", smart, degrade, baseline_mean)


def _drop_request_lines(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    if event.get("event") in ("request_finished", "server_started"):
        raise structlog.DropEvent
    return event


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=25.0, help="length of each run")
    parser.add_argument("--rate", type=float, default=40.0, help="requests per second")
    args = parser.parse_args()
    configure_logging(level="info", json=False)
    config = structlog.get_config()
    structlog.configure(processors=[_drop_request_lines, *config["processors"]])
    asyncio.run(main(args.seconds, args.rate))
