"""Benchmark: one of three regions turns busy mid-run; what a client sees, direct and via skyroute.

Three stand-in regions answer their first token in 40, 60 and 80 ms, then 8 tokens 5 ms
apart. A steady, paced load of chat completions (every other one streaming) runs for
``--duration`` seconds; a third of the way in, the fastest region (eu-west) goes into
DeepSeek's keep-alive busy mode: 200 at once, then only blank lines / ``: keep-alive``
comments, for as long as the client waits. The same load then runs, in the same invocation:

* **direct**: the client talks to eu-west itself (what an app without a gateway does), with a
  ``--client-timeout`` (default 5 s) as its only defence;
* **skyroute, failover**: one route over the three regions (``lowest-latency``, so eu-west
  gets the traffic while healthy), ``first_token_timeout: 1s``: a busy attempt is abandoned
  after 1 s of keep-alives and the next region tried;
* **skyroute, hedge N%**: the same plus ``hedge_after: 150ms``, once per ``--hedge-budget``
  (default 5 %, skyroute's default, and 100 %): a request without a first token by then is
  raced on the next region, as long as the hedge budget allows.

Printed per run, for JSON and streams apart (their healthy latencies differ by the token
time): requests, client-visible errors (a timeout, a non-200, an incomplete answer or an
in-band error event), the p50 of requests started before the flip ("healthy") and after it,
the whole run's p99 and its ratio to the healthy p50, and streams' time to the first content
token (TTFT). Latency is to the last byte and counts a failed request for as long as the
client waited. Also: how many calls reached eu-west after the flip (the stand-in counts
them) and skyroute's failovers and hedges from ``/metrics``. The load generator, the
stand-ins and skyroute share one event loop (uvloop) in this process, so absolute numbers
include the generator's own cost; compare the ratios.

Usage: python bench/failover.py [--duration 12] [--concurrency 12] [--rate 40]
                                [--client-timeout 5] [--hedge-budget 5% 100%]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import uvloop
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _client import quantile
from skyroute.proxy import Server
from skyroute.proxy._logging import configure_logging
from skyroute.proxy.demo import Behaviour, StandinUpstream
from skyroute.routing import parse_config

REGIONS = {"eu-west": 0.040, "us-east": 0.060, "ap-south": 0.080}
BUSY = "eu-west"
TOKENS, TOKEN_DELAY_S = 8, 0.005
KEY = "sk-bench"
FIRST_TOKEN_TIMEOUT = "1s"
HEDGE_AFTER = "150ms"
MESSAGES = [{"role": "user", "content": "hi"}]


@dataclass(slots=True)
class Sample:
    stream: bool
    started: float  # seconds since the run began
    latency_s: float  # to the last byte, or to the failure
    ttft_s: float | None  # streams: to the first content token
    error: str | None


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    url: str  # the chat completions URL
    model: str


def routing_file(ups: dict[str, StandinUpstream], *, hedge_budget: str | None) -> str:
    """One route over the regions; with ``hedge_budget``, hedging at ``HEDGE_AFTER`` too."""
    upstreams = "".join(
        f"  - name: {name}\n    url: {up.base_url}\n    api_key: {KEY}\n    region: {name}\n"
        f"    models: {{chat: deepseek-chat}}\n    first_token_timeout: {FIRST_TOKEN_TIMEOUT}\n"
        for name, up in ups.items())
    hedging = f"    hedge_after: {HEDGE_AFTER}\n" if hedge_budget else ""
    retry = f"retry:\n  hedge_budget: {hedge_budget}\n" if hedge_budget else ""
    return (f"listen: 127.0.0.1:0\nauth:\n  api_keys:\n    - name: bench\n      key: {KEY}\n"
            f"{retry}upstreams:\n{upstreams}routes:\n  - model: chat\n"
            f"    targets: [{', '.join(ups)}]\n    strategy: lowest-latency\n{hedging}")


async def one(session: aiohttp.ClientSession, target: Target, *, stream: bool, began: float
              ) -> Sample:
    """One request; a client-visible error is recorded, never raised."""
    t0 = time.perf_counter()
    ttft: float | None = None
    error: str | None = None
    body = {"model": target.model, "messages": MESSAGES, "stream": stream}
    try:
        async with session.post(target.url, json=body) as resp:
            if resp.status != 200:
                error = f"HTTP {resp.status}"
            elif stream:
                text, done = "", False
                async for line in resp.content:
                    if line.startswith(b"data: [DONE]"):
                        done = True
                    elif line.startswith(b"data: {"):
                        event = json.loads(line[6:])
                        if "error" in event:
                            error = f"error event: {event['error'].get('code')}"
                        for choice in event.get("choices", []):
                            piece = choice.get("delta", {}).get("content")
                            if piece and ttft is None:
                                ttft = time.perf_counter() - t0
                            text += piece or ""
                if error is None and not (done and text.startswith("Hello from")):
                    error = "incomplete stream"
            else:
                answer = json.loads(await resp.read())
                if not answer["choices"][0]["message"]["content"].startswith("Hello from"):
                    error = "incomplete answer"
    except (TimeoutError, aiohttp.ClientError, ValueError, KeyError) as exc:
        error = type(exc).__name__
    return Sample(stream=stream, started=t0 - began, latency_s=time.perf_counter() - t0,
                  ttft_s=ttft, error=error)


@dataclass(slots=True)
class Run:
    samples: list[Sample]
    busy_calls: int  # requests the busy region received after the flip


async def run_load(target: Target, busy: StandinUpstream, args: argparse.Namespace) -> Run:
    """``concurrency`` paced workers for ``duration`` s; ``busy`` flips a third of the way in.

    Each worker sends at most one request per ``concurrency / rate`` seconds; one that fell
    behind (a slow answer) starts its next request at once rather than bursting to catch up.
    """
    samples: list[Sample] = []
    period = args.concurrency / args.rate
    timeout = aiohttp.ClientTimeout(total=args.client_timeout)
    headers = {"Authorization": f"Bearer {KEY}"}
    sent = calls_at_flip = 0
    async with aiohttp.ClientSession(timeout=timeout, headers=headers,
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        for i in range(args.concurrency):  # warm-up: connections, and latency estimates
            warm_up = await one(session, target, stream=bool(i % 2), began=0.0)
            if warm_up.error is not None:
                raise RuntimeError(f"{target.name}: warm-up request failed: {warm_up.error}")
        began = time.perf_counter()
        end = began + args.duration

        async def worker(w: int) -> None:
            nonlocal sent
            next_at = began + w * period / args.concurrency
            while next_at < end:
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                sent += 1
                samples.append(await one(session, target, stream=bool(sent % 2), began=began))
                next_at = max(next_at + period, time.perf_counter())

        async def flip() -> None:
            nonlocal calls_at_flip
            await asyncio.sleep(args.duration / 3)
            busy.behaviour.mode, calls_at_flip = "busy", busy.requests_total

        await asyncio.gather(flip(), *(worker(w) for w in range(args.concurrency)))
    busy_calls = busy.requests_total - calls_at_flip
    busy.behaviour.mode = "ok"  # releases anything still held busy
    await busy.wait_for(lambda u: u.in_flight == 0, timeout=args.client_timeout + 5)
    return Run(samples=samples, busy_calls=busy_calls)


async def skyroute_counts(server: Server) -> str:
    """Failovers and hedges, as skyroute's ``/metrics`` counted them."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session, \
            session.get(f"{server.url}/metrics") as resp:
        text = await resp.text()
    values = {(s.name, tuple(sorted(s.labels.values()))): s.value
              for family in text_string_to_metric_families(text) for s in family.samples}
    failovers = values.get(("skyroute_failovers_total", ("chat",)), 0)
    won = values.get(("skyroute_hedges_total", ("chat", "won")), 0)
    lost = values.get(("skyroute_hedges_total", ("chat", "lost")), 0)
    return f"failovers {failovers:.0f}, hedges won {won:.0f} / lost {lost:.0f}"


def report(name: str, run: Run, flip_at: float, extra: str) -> None:
    """Two table rows, JSON and streams (their healthy latencies differ by the token time).

    Latency counts every request, a failed one for as long as the client waited.
    """
    for stream in (False, True):
        samples = [s for s in run.samples if s.stream is stream]
        errors = sum(s.error is not None for s in samples)
        lat = [s.latency_s * 1000 for s in samples]
        after = [s.latency_s * 1000 for s in samples if s.started >= flip_at]
        healthy = statistics.median([s.latency_s * 1000 for s in samples if s.started < flip_at])
        ttft = [s.ttft_s * 1000 for s in samples if s.ttft_s is not None and s.error is None]
        ttft_text = f"{quantile(ttft, 0.5):>5.0f} {quantile(ttft, 0.99):>5.0f}" if stream else ""
        print(f"{name if not stream else '':<22} {'stream' if stream else 'json':<6} "
              f"{len(samples):>5} {errors / max(1, len(samples)):>7.1%} {healthy:>8.0f} "
              f"{quantile(after, 0.5):>6.0f} {quantile(lat, 0.99):>6.0f} "
              f"{quantile(lat, 0.99) / healthy:>8.1f}x {ttft_text}")
    errors_seen = [s.error for s in run.samples if s.error is not None]
    after_flip = [s for s in run.samples if s.started >= flip_at]
    failed = sum(s.error is not None for s in after_flip)
    notes = [f"after the flip {failed} of {len(after_flip)} requests failed and {run.busy_calls} "
             f"calls reached {BUSY}", extra]
    if errors_seen:
        notes.append(f"errors: {({e: errors_seen.count(e) for e in sorted(set(errors_seen))})}")
    print(f"{'':<22} " + "; ".join(filter(None, notes)))


async def main(args: argparse.Namespace) -> int:
    ups = {name: StandinUpstream(name, api_key=KEY, behaviour=Behaviour(
        ttft_s=ttft, tokens=TOKENS, token_delay_s=TOKEN_DELAY_S)) for name, ttft in REGIONS.items()}
    for up in ups.values():
        await up.start()
    flip_at = args.duration / 3
    print(f"regions (TTFT): {', '.join(f'{n} {s * 1000:.0f} ms' for n, s in REGIONS.items())}, "
          f"{TOKENS} tokens {TOKEN_DELAY_S * 1000:.0f} ms apart; {BUSY} busy (keep-alive) from "
          f"t={flip_at:.0f} s; {args.rate:g} requests/s from {args.concurrency} paced clients "
          f"for {args.duration:g} s per run, half streaming; client timeout "
          f"{args.client_timeout:g} s; skyroute first_token_timeout {FIRST_TOKEN_TIMEOUT}, "
          f"hedge_after {HEDGE_AFTER}; latency in ms, to the last byte")
    print(f"{'run':<22} {'mode':<6} {'reqs':>5} {'errors':>7} {'healthy':>8} {'after':>6} "
          f"{'p99':>6} {'p99/healthy':>9} {'TTFT p50 p99':>11}")
    runs = [("skyroute, failover", None)] + [
        (f"skyroute, hedge {budget}", budget) for budget in args.hedge_budget]
    skyroute_errors = 0
    try:
        direct = Target(f"direct to {BUSY}", f"{ups[BUSY].base_url}/chat/completions",
                        "deepseek-chat")
        report(direct.name, await run_load(direct, ups[BUSY], args), flip_at, "")
        for name, budget in runs:
            server = Server(parse_config(routing_file(ups, hedge_budget=budget), env={}), port=0,
                            grace_s=1.0)
            await server.start()
            try:
                target = Target(name, f"{server.url}/v1/chat/completions", "chat")
                run = await run_load(target, ups[BUSY], args)
                report(name, run, flip_at, await skyroute_counts(server))
                skyroute_errors += sum(s.error is not None for s in run.samples)
            finally:
                await server.aclose()
    finally:
        for up in ups.values():
            await up.aclose()
    print("(errors: client-visible; healthy: p50 of the requests started before the flip; "
          "after: p50 of those started after it; p99: of the whole run; TTFT: streams' first "
          "content token)")
    return 1 if skyroute_errors else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=12.0, help="seconds per run")
    parser.add_argument("--concurrency", type=int, default=12, help="paced client workers")
    parser.add_argument("--rate", type=float, default=40.0, help="requests/s over all workers")
    parser.add_argument("--client-timeout", type=float, default=5.0,
                        help="the client's total timeout per request, seconds")
    parser.add_argument("--hedge-budget", nargs="*", default=["5%", "100%"],
                        help="one hedging run per retry.hedge_budget given (default: 5%% "
                             "(skyroute's default) and 100%%)")
    arguments = parser.parse_args()
    # skyroute logs every request and failover; only its errors belong beside the table.
    configure_logging(level="error", json=False)
    sys.exit(uvloop.run(main(arguments)))
