"""Benchmark: does per-request cost stay flat as the configuration grows?

Grows one dimension at a time and prints the cost per request (or per reload), with the
ratio to the smallest size, all measured in this run:

* routing: 1 -> 1,000 upstreams, each with its own route, through the Router API a
  request goes through (``route_for``, ``serving``, ``plan``, ``next_attempt``, and the
  plan's and router's ``record`` of a success); also 1,000 upstreams behind one route
  of three targets, which is what "routing cost is independent of fleet size" means;
* client keys: 1 -> 100,000 keys, the lookup ``authenticate`` makes (``ClientKeys.find``);
* redaction: 1 -> 100,000 registered secrets, the cost of one structured log line
  (``redact_processor``) and of redacting a line holding a secret (``redact``), beside
  the regex alternation of every secret used before;
* reload: reading and validating a routing file of 1 -> 1,000 upstreams and routes
  (``load_config``), and swapping it in (``Serving.swap``: ``Router.update``).

No sockets, no processes: this measures the code on one core, not the network. Goals
(issue 14): routing at 1,000 upstreams within 2x its cost at 3; the key check
independent of the number of keys; log redaction independent of the number of secrets.

Usage: python bench/scale.py [--quick]
"""

from __future__ import annotations

import argparse
import functools
import gc
import hashlib
import re
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from skyroute.proxy import load_config
from skyroute.proxy._client_keys import ClientKeys
from skyroute.proxy._redact import REDACTED, redact, redact_processor, register_secrets
from skyroute.proxy._state import Runtime, Serving
from skyroute.routing import (
    ApiKey,
    AttemptOutcome,
    Config,
    Result,
    Router,
    Target,
    parse_config,
)


def config_text(upstreams: int, *, routes: int | None = None, targets: int = 3) -> str:
    """A routing file of ``upstreams`` upstreams; ``routes`` routes (default: one per
    upstream), each over ``targets`` consecutive upstreams."""
    routes = upstreams if routes is None else routes
    targets = min(targets, upstreams)
    served: list[list[str]] = [[] for _ in range(upstreams)]  # aliases each upstream serves
    route_lines = ["routes:"]
    for r in range(routes):
        names = [(r + t) % upstreams for t in range(targets)]
        for i in names:
            served[i].append(f"m{r}: model-{r}")
        route_lines += [f"  - model: m{r}", f"    targets: [{', '.join(f'up{i}' for i in names)}]"]
    lines = ["listen: 127.0.0.1:0", "upstreams:"]
    for i in range(upstreams):
        lines += [f"  - name: up{i}", f"    url: http://10.0.{i // 250}.{i % 250}:8000/v1",
                  "    api_key: sk-up", f"    region: r{i % 7}",
                  f"    models: {{{', '.join(served[i]) or f'x{i}: x'}}}"]
    return "\n".join(lines + route_lines) + "\n"


def per_call_us(fn: Callable[[], object], *, seconds: float) -> float:
    """Median over 5 batches of the mean time per call, in microseconds."""
    n = 1
    while True:  # find a batch size that takes about seconds / 5
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        took = time.perf_counter() - t0
        if took > seconds / 10 or n > 1 << 22:
            break
        n *= 2
    batches = []
    gc.disable()
    try:
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            batches.append((time.perf_counter() - t0) / n * 1e6)
    finally:
        gc.enable()
    return statistics.median(batches)


def one_request(router: Router, model: str, clock: list[float]) -> Callable[[], object]:
    """What routing does for one request that succeeds at the first attempt."""

    def run() -> object:
        clock[0] += 0.001  # each request a millisecond later
        now = clock[0]
        route = router.route_for(model)
        assert route is not None
        router.serving(route, n=None, now=now)
        plan = router.plan(route, now=now)
        target = plan.next_attempt(now=now)
        assert isinstance(target, Target)
        outcome = AttemptOutcome(target=target, result=Result.SUCCESS, ttfb_s=0.05)
        plan.record(outcome, now=now)
        return router.record(outcome, now=now)

    return run


def bench_routing(sizes: list[int], seconds: float) -> list[str]:
    out = ["routing per request (route_for, serving, plan, next_attempt, record)",
           f"{'upstreams':>10} {'routes':>7} {'us/request':>11} {'vs smallest':>12}"]
    base = None
    for n in sizes:
        for routes in sorted({n, 1}):
            router = Router(parse_config(config_text(n, routes=routes), env={}))
            one_request(router, "m0", [0.0])()  # warm: first-use work is not per request
            cost = per_call_us(one_request(router, "m0", [1000.0]), seconds=seconds)
            base = base or cost
            out.append(f"{n:>10} {routes:>7} {cost:>11.1f} {cost / base:>11.2f}x")
    return out


def bench_keys(sizes: list[int], seconds: float) -> list[str]:
    out = ["client key check (ClientKeys.find: one SHA-256, one dict lookup; before: an "
           "lru_cache keyed on the tuple of keys, hashed on every request)",
           f"{'keys':>10} {'build ms':>9} {'us/check':>9} {'vs smallest':>12} "
           f"{'before us/check':>16}"]
    base = None
    for n in sizes:
        keys = [ApiKey(name=f"k{i}", key=f"sk-client-{i:06d}-{'x' * 24}") for i in range(n)]
        t0 = time.perf_counter()
        table = ClientKeys(keys)
        built_ms = (time.perf_counter() - t0) * 1e3
        given = keys[n // 2].key
        cost = per_call_us(lambda table=table, given=given: table.find(given), seconds=seconds)
        key_tuple = tuple(keys)
        before = per_call_us(lambda k=key_tuple, given=given: _before(k).get(
            hashlib.sha256(given.encode()).digest()), seconds=seconds)
        base = base or cost
        out.append(f"{n:>10} {built_ms:>9.1f} {cost:>9.2f} {cost / base:>11.2f}x "
                   f"{before:>16.2f}")
    return out


@functools.lru_cache(maxsize=4)
def _before(keys: tuple[ApiKey, ...]) -> dict[bytes, ApiKey]:
    """The lookup table as it was made before (main before issue 14), for comparison."""
    return {hashlib.sha256(k.key.encode()).digest(): k for k in keys}


def bench_redaction(sizes: list[int], seconds: float) -> list[str]:
    out = ["log redaction (redact_processor per log line; redact of a line holding a secret; "
           "before: one regex alternation of every secret, its search alone)",
           f"{'secrets':>10} {'register ms':>12} {'us/line':>8} {'us/secret line':>15} "
           f"{'vs smallest':>12} {'before: compile ms':>19} {'us/line':>8}"]
    # Random keys, as real ones are (all sharing a prefix would flatter the old regex).
    known = [secrets.token_urlsafe(24) for _ in range(max(sizes))]
    line = {"event": "request_done", "request_id": "0123456789abcdef0123456789abcdef",
            "upstream": "azure-east", "model": "gpt-4o", "status": 200, "ttfb_ms": 123,
            "path": "/v1/chat/completions", "route": "m0", "attempt": 1}
    base = None
    for n in sizes:  # the registry only grows: each size adds to the one before
        t0 = time.perf_counter()
        register_secrets(known[:n])
        register_ms = (time.perf_counter() - t0) * 1e3
        held = f"upstream said: key={known[n // 2]}&x=1 (retrying)"
        assert known[n // 2] not in redact(held) and REDACTED in redact(held)
        cost = per_call_us(lambda: redact_processor(None, "info", dict(line)), seconds=seconds)
        held_cost = per_call_us(lambda held=held: redact(held), seconds=seconds)
        t0 = time.perf_counter()
        before = re.compile("|".join(re.escape(s) for s in sorted(known[:n], key=len,
                                                                    reverse=True)))
        compile_ms = (time.perf_counter() - t0) * 1e3
        text = "\n".join(v for v in line.values() if isinstance(v, str))
        before_cost = per_call_us(lambda before=before, text=text: before.search(text),
                                  seconds=seconds)
        base = base or cost
        out.append(f"{n:>10} {register_ms:>12.1f} {cost:>8.2f} {held_cost:>15.2f} "
                   f"{cost / base:>11.2f}x {compile_ms:>19.0f} {before_cost:>8.2f}")
    return out


def bench_reload(sizes: list[int]) -> list[str]:
    out = ["config reload (load_config: read + validate; swap: Router.update + Runtime)",
           f"{'upstreams':>10} {'bytes':>8} {'load ms':>8} {'swap ms':>8}"]
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            path = Path(tmp) / f"routing-{n}.yaml"
            path.write_text(config_text(n))
            loads, swaps = [], []
            serving: Serving | None = None
            for _ in range(3):
                t0 = time.perf_counter()
                config: Config = load_config(path)
                loads.append(time.perf_counter() - t0)
                if serving is None:
                    serving = Serving(runtime=Runtime(config=config, router=Router(config)))
                t0 = time.perf_counter()
                serving.swap(config)
                swaps.append(time.perf_counter() - t0)
            out.append(f"{n:>10} {path.stat().st_size:>8} {min(loads) * 1e3:>8.1f} "
                       f"{min(swaps) * 1e3:>8.1f}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter timings (CI)")
    args = ap.parse_args(argv)
    seconds = 0.2 if args.quick else 1.0
    for lines in (bench_routing([1, 3, 10, 100, 1000], seconds),
                  bench_keys([1, 10, 1000, 100_000], seconds),
                  bench_redaction([1, 100, 10_000, 100_000], seconds),
                  bench_reload([1, 10, 100, 1000])):
        print("\n".join(lines) + "\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
