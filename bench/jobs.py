"""Benchmark: how fast skyroute accepts durable jobs, ingests batch lines and drains them.

One ``skyroute run --workers 1`` pinned to core 1 (with taskset, when there are two) with
``jobs:`` on SQLite (or ``--redis``): one process whose lane yields by its CPU share, or
(with Redis, or ``--lane '{process: separate}'``) a serving worker and a jobs worker at idle
CPU priority (``jobs.lane.process``), in front of the 0 ms stand-in
(``bench/_upstream.py``) on core 0, where this process (the load generator) runs too. In
one run (``--phases`` picks some):

* **sync**: ``--concurrency`` clients send chat completions synchronously (the baseline);
* **drain**: the same clients send the same body to ``/v1/async/chat/completions``; each
  answer is a 202 once the job is on disk; the lane drains the queue meanwhile;
* **batch**: a ``--batch-lines`` file is uploaded and a batch created; lines per second
  from create to ``in_progress`` (validated and queued) and to ``completed``;
* **interactive**: chat completions paced at ``--interactive-rate``, alone and while a
  batch drains, in ``--rounds`` rounds: the p99 of all requests beside a batch over that
  of all alone (goal <= 1.10x), with a 90 % interval of that ratio (a block bootstrap);
* **saturated**: ``--concurrency`` clients keep skyroute's core busy while a batch drains,
  and a trickle of async submits beside them is timed (where the lane runs matters: a jobs
  worker the kernel sets aside can hold the SQLite write lock a submit needs);
* **busy**: a batch drained while the upstream answers 503 every other half second;
* **accept**: async submits paced at ``--rate`` (open loop, ``_paced_load``: a load
  generator cheap enough not to be the bottleneck) whose jobs never run (routed to an
  upstream that never answers), so the phase measures accepting alone: accepts/s and p99
  against the goal (3,200/s on one core, p99 < 10 ms), and per skyroute CPU second.

Printed with each: skyroute's CPU seconds (``/proc/<pid>/stat``, its workers together), so
"per CPU second" does not depend on how busy the machine is, and how long skyroute's
serving event loop and the load
generator waited for their cores (``/proc/<pid>/task/<tid>/schedstat``): on a machine busy
with other work, latency that is not skyroute's. ``--nice -10`` (as root) gives the three
processes priority over that work.

With ``--profile`` skyroute runs under cProfile (started and stopped by signals, as
``bench/instructions.py --profile`` does) while the batch phase's lines run (from
``in_progress`` to ``completed``, status polls included): printed per line are the store's
round trips (redis-py's sends, the responses read, script calls; SQLite's statements) and
where the Python time goes, then the top functions by own time.

Usage: python bench/jobs.py [--duration 5] [--concurrency 64] [--batch-lines 10000]
                           [--rate 3200] [--interactive-rate 200] [--rounds 3] [--redis URL|own]
                           [--phases sync drain batch interactive saturated busy accept] [--nice N]
                           [--lane '{process: inline}'] [--profile] [--upstream canned]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import io
import json
import os
import pstats
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import uvloop
import yaml
from _paced_load import PacedResult, paced_posts
from instructions import PROFILED
from overhead import (
    cpu_seconds,
    free_port,
    logged_event,
    read_url_line,
    record_answers,
    wait_for_listening,
)
from skyroute.proxy import load_config
from skyroute.routing import LaneProcess

HERE = Path(__file__).resolve().parent
KEY = "sk-bench-client"
UPSTREAM_KEY = "sk-bench-upstream"
BODY = json.dumps({"model": "chat", "messages": [{"role": "user", "content": "hi"}]}).encode()
#: How long a skyroute this bench starts may take to listen (cProfile'd included).
START_TIMEOUT_S = 60.0
#: Routed to an upstream that never answers: its jobs wait in the lane (16 at most) and
#: use no CPU, so the accept phase measures accepting alone.
PARKED = json.dumps({"model": "parked", "messages": [{"role": "user", "content": "hi"}]}).encode()


@dataclass(frozen=True, slots=True)
class Processes:
    """The skyroute run being measured: whose CPU counts, whose waits for a core matter."""

    serving: int  # the process serving clients (its event loop's waits are theirs)
    all: tuple[int, ...]  # every process running skyroute's work (their CPU summed)
    jobs: int | None = None  # the jobs worker (at idle priority), if there is one


def cpu_wait_seconds(pid: int) -> float:
    """Time ``pid``'s main thread (skyroute's event loop) spent ready to run but waiting
    for its core: latency that the machine's other work caused (and, briefly, the
    process's own other threads)."""
    with contextlib.suppress(OSError):
        return int(Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()[1]) / 1e9
    return 0.0


async def load(url: str, *, duration: float, concurrency: int, expect: int,
               body: bytes = BODY) -> list[float]:
    """Latencies (s) of requests sent back to back by ``concurrency`` clients."""
    latencies: list[float] = []
    stop_at = time.perf_counter() + duration
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=30)) as http:
        async def client() -> None:
            while time.perf_counter() < stop_at:
                started = time.perf_counter()
                async with http.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status != expect:
                        raise RuntimeError(f"{url}: HTTP {resp.status}")
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return latencies


def summary(name: str, latencies: list[float], duration: float, cpu: float) -> float:
    rate = len(latencies) / duration
    q = statistics.quantiles(latencies, n=100)
    print(f"{name:<14} {rate:>9.0f}/s  p50 {q[49] * 1000:6.2f} ms  p99 {q[98] * 1000:6.2f} ms  "
          f"skyroute CPU {cpu:5.2f} s = {len(latencies) / cpu:>6.0f} per CPU second")
    return rate


async def queue_empty(http: aiohttp.ClientSession, url: str) -> bool:
    async with http.get(f"{url}/health") as resp:
        jobs = (await resp.json())["jobs"]["jobs"]
    return jobs["queued"] + jobs["running"] == 0


def p99_ms(latencies: list[float]) -> float:
    return statistics.quantiles(latencies, n=100)[98] * 1000


PHASES = ("sync", "drain", "batch", "interactive", "saturated", "busy", "accept")


async def run(args: argparse.Namespace, url: str, sky: Processes, control: str) -> None:
    phases = set(args.phases)
    sync_rate = None
    if "sync" in phases:
        cpu0 = cpu_seconds(sky.all)
        sync = await load(f"{url}/v1/chat/completions", duration=args.duration,
                          concurrency=args.concurrency, expect=200)
        sync_rate = summary("sync", sync, args.duration, cpu_seconds(sky.all) - cpu0)
    if "drain" in phases:
        cpu1 = cpu_seconds(sky.all)
        accepted = await load(f"{url}/v1/async/chat/completions", duration=args.duration,
                              concurrency=args.concurrency, expect=202)
        summary("async+drain", accepted, args.duration, cpu_seconds(sky.all) - cpu1)
        started = time.perf_counter()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            while not await queue_empty(http, url):
                await asyncio.sleep(0.1)
        drained = time.perf_counter() - started
        print(f"  drain: {len(accepted)} jobs run, the last {drained:.1f} s after the phase "
              "ended")
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0,
                                  timeout=60) as client:
        ok_rate = await batch_ingest(args, client, sky) if "batch" in phases else None
        if "interactive" in phases:
            await interactive_impact(args, url, client, sky)
        if "saturated" in phases:
            await saturated_submits(args, url, client)
        if "busy" in phases:
            await busy_half(args, client, control, ok_rate)
    if "accept" in phases:
        # Last: these jobs never finish (their upstream never answers), so nothing drains
        # and the phase measures accepting alone.
        await accept_rate(args, url, sky, sync_rate)


async def accept_rate(args: argparse.Namespace, url: str, sky: Processes,
                      sync_rate: float | None) -> None:
    """Async submits paced at ``--rate`` (open loop, the cheap load generator on the other
    core): accepts per second, p99 against the goal, and per skyroute CPU second."""
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    await paced_posts(f"{url}/v1/async/chat/completions", PARKED, headers, rate=args.rate,
                      duration=min(1.0, args.duration))  # warm-up: connections, caches
    cpu0, waited0, own0 = cpu_seconds(sky.all), cpu_wait_seconds(sky.serving), time.process_time()
    own_waited0 = cpu_wait_seconds(os.getpid())
    result = await paced_posts(f"{url}/v1/async/chat/completions", PARKED, headers,
                               rate=args.rate, duration=args.duration,
                               connections=args.concurrency)
    cpu, waited = cpu_seconds(sky.all) - cpu0, cpu_wait_seconds(sky.serving) - waited0
    own, own_waited = time.process_time() - own0, cpu_wait_seconds(os.getpid()) - own_waited0
    if set(result.statuses) != {202}:
        raise RuntimeError(f"async submits answered {dict(result.statuses)}")
    q = statistics.quantiles(result.latencies, n=100)
    met = result.rate >= 0.98 * args.rate and q[98] * 1000 < ACCEPT_P99_GOAL_MS
    print(f"async accept   paced at {args.rate:.0f}/s: {result.rate:.0f} accepts/s, "
          f"p50 {q[49] * 1000:.2f} ms, p99 {q[98] * 1000:.2f} ms; skyroute CPU {cpu:.2f} s = "
          f"{len(result.latencies) / cpu:.0f} accepts per CPU second "
          f"(goal: {ACCEPT_RATE_GOAL:,}/s on one core with p99 < {ACCEPT_P99_GOAL_MS} ms: "
          f"{'met' if met else 'NOT met'})")
    print(f"  over {result.seconds:.1f} s: skyroute's event loop waited {waited:.2f} s for its "
          f"core; the load generator used {own:.2f} s of CPU and waited {own_waited:.2f} s for "
          "one")
    if sync_rate:
        print(f"ratio accepts/s / sync requests/s: {result.rate / sync_rate:.2f}x")


#: The issue's goals for accepting async requests on one core.
ACCEPT_RATE_GOAL = 3200
ACCEPT_P99_GOAL_MS = 10.0


def batch_file(lines: int) -> bytes:
    return b"".join(json.dumps({"custom_id": f"r{i}", "method": "POST",
                                "url": "/v1/chat/completions",
                                "body": json.loads(BODY)}).encode() + b"\n"
                    for i in range(lines))


async def start_batch(client: openai.AsyncOpenAI, lines: int) -> str:
    f = await client.files.create(file=("in.jsonl", io.BytesIO(batch_file(lines))),
                                  purpose="batch")
    batch = await client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                        completion_window="24h")
    return batch.id


#: How often a batch's status is polled once it runs. Polls are client requests, and the
#: lane yields to clients: polling every few tens of ms would throttle the drain measured
#: (an SDK user polls seconds apart).
POLL_S = 0.25


async def until_done(client: openai.AsyncOpenAI, batch_id: str) -> Any:
    while (batch := await client.batches.retrieve(batch_id)).status not in (
            "completed", "failed"):
        await asyncio.sleep(POLL_S)
    assert batch.status == "completed", batch
    return batch


async def batch_ingest(args: argparse.Namespace, client: openai.AsyncOpenAI,
                       sky: Processes) -> float:
    """Lines per second validated and queued, and run to the end (all upstream answers ok),
    and skyroute's CPU per line (the upload, validation, run, status polls and results)."""
    began, cpu0 = time.perf_counter(), cpu_seconds(sky.all)
    redis_cpu0 = cpu_seconds((args.redis_pid,)) if args.redis_pid else 0.0
    batch_id = await start_batch(client, args.batch_lines)
    queued_at = None
    while (batch := await client.batches.retrieve(batch_id)).status not in (
            "completed", "failed"):
        await asyncio.sleep(0.02 if queued_at is None else POLL_S)
        if queued_at is None and batch.status != "validating":
            queued_at = time.perf_counter() - began
            if args.profile_dir:
                await profile_signal(sky.serving, signal.SIGUSR1, args.profile_dir / "started")
                profiled_cpu0, commands0 = cpu_seconds(sky.all), redis_commands(args.redis)
    total, cpu = time.perf_counter() - began, cpu_seconds(sky.all) - cpu0
    redis_cpu = cpu_seconds((args.redis_pid,)) - redis_cpu0 if args.redis_pid else 0.0
    if args.profile_dir:
        profiled_cpu = cpu_seconds(sky.all) - profiled_cpu0
        commands = {name: calls - commands0.get(name, 0)
                    for name, calls in redis_commands(args.redis).items()}
        await profile_signal(sky.serving, signal.SIGUSR2, args.profile_dir / "skyroute.done")
        print_profile(args.profile_dir / "skyroute.prof", args.batch_lines, profiled_cpu,
                      commands)
    assert queued_at is not None and batch.status == "completed", batch
    print(f"batch ingest   {args.batch_lines} lines validated and queued in {queued_at:.2f} s "
          f"= {args.batch_lines / queued_at:.0f} lines/s; completed in {total:.1f} s = "
          f"{args.batch_lines / total:.0f} lines/s; skyroute CPU {cpu:.2f} s = "
          f"{cpu / args.batch_lines * 1e6:.0f} us per line" + (
              f"; redis-server CPU {redis_cpu / args.batch_lines * 1e6:.0f} us per line"
              if args.redis_pid else ""))
    return args.batch_lines / total


async def interactive_impact(args: argparse.Namespace, url: str,
                             client: openai.AsyncOpenAI, sky: Processes) -> None:
    """Paced interactive requests alone and while a batch drains, in ``--rounds`` rounds
    (alone, beside a new batch, then that batch run to its end) and one more alone window;
    after a discarded warm-up window.

    A p99 at 200/s over a few seconds is the 8th-worst of 800 requests: two windows
    alone differed by 1.1-2.9x on this machine. So the verdict compares
    the p99 of every alone window's requests pooled with that of every beside window's,
    and prints a 90 % interval of that ratio (``bootstrap_ratio``): how far the p99 of
    this many requests moves by itself. Printed per window: how long skyroute's serving
    event loop, the load generator and Redis waited for a core (the machine's other work,
    and Redis's own) and Redis's CPU, and the jobs worker's CPU."""
    chat = f"{url}/v1/chat/completions"
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    pids = [sky.serving, os.getpid(), *([args.redis_pid] if args.redis_pid else [])]

    async def window(duration: float) -> tuple[list[list[float]], str]:
        waited0, redis_cpu0 = [cpu_wait_seconds(p) for p in pids], (
            cpu_seconds((args.redis_pid,)) if args.redis_pid else 0.0)
        jobs_cpu0 = cpu_seconds((sky.jobs,)) if sky.jobs else 0.0
        yields0 = await lane_yields(url)
        # No collection in this process while it measures: a full one (after a batch file
        # of 4,000 lines was built, just before a window beside it) stops the load
        # generator for 30-80 ms, which set whole windows' p99.
        gc.collect()
        gc.disable()
        try:
            result = await paced_posts(chat, BODY, headers, rate=args.interactive_rate,
                                       duration=duration, connections=32)
        finally:
            gc.enable()
        if set(result.statuses) != {200}:
            raise RuntimeError(f"interactive requests answered {dict(result.statuses)}")
        waited = [cpu_wait_seconds(p) - w for p, w in zip(pids, waited0, strict=True)]
        yielded = await lane_yields(url) - yields0
        note = (f"p99 {p99_ms(result.latencies):.2f} ms, waited "
                + " / ".join(f"{w * 1000:.0f}" for w in waited)
                + (f" (redis CPU {cpu_seconds((args.redis_pid,)) - redis_cpu0:.2f} s)"
                   if args.redis_pid else "")
                + (f", jobs worker CPU {cpu_seconds((sky.jobs,)) - jobs_cpu0:.2f} s"
                   if sky.jobs else "")
                + (f", share cut {yielded:.0f}x" if yielded else ""))
        return blocks_of(result), note

    await window(1.0)  # warm-up: connections, caches, the first windows' outliers
    alone: list[list[float]] = []  # latencies by block (BLOCK_S of due times)
    beside: list[list[float]] = []
    notes: list[str] = []
    drained = 0.0
    for _ in range(args.rounds):
        blocks, note = await window(args.duration)
        alone += blocks
        notes.append("alone " + note)
        batch_id = await start_batch(client, args.batch_lines)
        while (await client.batches.retrieve(batch_id)).status == "validating":
            await asyncio.sleep(0.02)
        before = (await client.batches.retrieve(batch_id)).request_counts.completed
        began = time.perf_counter()
        blocks, note = await window(args.duration)
        beside += blocks
        notes.append("beside " + note)
        ran = (await client.batches.retrieve(batch_id)).request_counts.completed - before
        drained += ran / (time.perf_counter() - began)
        batch = await until_done(client, batch_id)
        if batch.request_counts.completed != args.batch_lines:
            raise RuntimeError(f"the batch drained beside clients ended with {batch}")
    blocks, note = await window(args.duration)
    alone += blocks
    notes.append("alone " + note)
    alone_p99 = p99_ms([t for b in alone for t in b])
    beside_p99 = p99_ms([t for b in beside for t in b])
    ratio = beside_p99 / alone_p99
    low, high = bootstrap_ratio(alone, beside)
    verdict = "met" if ratio <= INTERACTIVE_P99_GOAL else "NOT met"
    print(f"interactive    {args.interactive_rate:.0f}/s, {args.rounds} rounds: p99 "
          f"{alone_p99:.2f} ms alone ({sum(map(len, alone))} requests), {beside_p99:.2f} ms "
          f"while a batch drains ({sum(map(len, beside))}): {ratio:.2f}x, 90 % interval "
          f"{low:.2f}-{high:.2f}x (goal <= {INTERACTIVE_P99_GOAL:.2f}x: {verdict}"
          + (", the interval straddles it" if low <= INTERACTIVE_P99_GOAL < high else "")
          + "); "
          f"{drained / args.rounds:.0f} lines/s drained beside them")
    print("  per window (ms waited for a core by skyroute's loop / the load generator"
          + (" / redis-server" if args.redis_pid else "") + "): " + "; ".join(notes))


async def saturated_submits(args: argparse.Namespace, url: str,
                            client: openai.AsyncOpenAI) -> None:
    """Async submits paced at ``SATURATED_SUBMITS``/s while ``--concurrency`` clients keep
    skyroute's serving core busy with chat completions and a batch drains: how long a
    submit waits when the lane runs in a process the kernel sets aside (a jobs worker
    holding the SQLite write lock keeps it until the core is left to it)."""
    batch_id = await start_batch(client, args.batch_lines)
    while (await client.batches.retrieve(batch_id)).status == "validating":
        await asyncio.sleep(0.02)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    clients = asyncio.ensure_future(load(f"{url}/v1/chat/completions", duration=args.duration,
                                         concurrency=args.concurrency, expect=200))
    submits = await paced_posts(f"{url}/v1/async/chat/completions", BODY, headers,
                                rate=SATURATED_SUBMITS, duration=args.duration, connections=4)
    served = await clients
    if set(submits.statuses) != {202}:
        raise RuntimeError(f"async submits answered {dict(submits.statuses)}")
    q = statistics.quantiles(submits.latencies, n=100)
    print(f"saturated      {len(served) / args.duration:.0f} chat completions/s (p99 "
          f"{p99_ms(served):.1f} ms) while a batch drains; async submits paced at "
          f"{SATURATED_SUBMITS}/s beside them: p50 {q[49] * 1000:.1f} ms, p99 "
          f"{q[98] * 1000:.1f} ms, worst {max(submits.latencies) * 1000:.0f} ms")
    await until_done(client, batch_id)


#: The saturated phase's submits per second (a trickle beside the clients).
SATURATED_SUBMITS = 20

#: Requests are grouped by when they were due into blocks this long: a stall delays the
#: requests of a few ms together, so requests are not independent samples; blocks are.
BLOCK_S = 0.25
#: Resamples of the interactive phase's bootstrap.
RESAMPLES = 1000


def blocks_of(result: PacedResult) -> list[list[float]]:
    """A paced run's latencies in ``BLOCK_S`` blocks of due time."""
    blocks: dict[int, list[float]] = {}
    for latency, due in zip(result.latencies, result.due, strict=True):
        blocks.setdefault(int(due / BLOCK_S), []).append(latency)
    return list(blocks.values())


def bootstrap_ratio(alone: list[list[float]], beside: list[list[float]],
                    ) -> tuple[float, float]:
    """A 90 % interval of p99 beside / p99 alone: a block bootstrap (each condition's
    blocks drawn again with replacement, ``RESAMPLES`` times), so a verdict can tell a
    drain's effect from how much the p99 of this many requests moves by itself."""
    rng = random.Random(0)
    ratios = sorted(
        p99_ms([t for b in rng.choices(beside, k=len(beside)) for t in b])
        / p99_ms([t for b in rng.choices(alone, k=len(alone)) for t in b])
        for _ in range(RESAMPLES))
    return ratios[int(RESAMPLES * 0.05)], ratios[int(RESAMPLES * 0.95) - 1]


async def lane_yields(url: str) -> float:
    """``skyroute_jobs_lane_yields_total``: ticks in which the lane gave CPU back to
    clients (/metrics is not a client request: reading it does not move the lane)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http, \
            http.get(f"{url}/metrics") as resp:
        text = await resp.text()
    found = re.search(r"^skyroute_jobs_lane_yields_total (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def profile_signal(pid: int, signum: int, marker: Path) -> None:
    """Start or stop the profiled skyroute's cProfile; return once it says it did."""
    os.kill(pid, signum)
    deadline = time.monotonic() + 60
    while not marker.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the profiled skyroute did not write {marker.name}")
        await asyncio.sleep(0.02)


def redis_commands(url: str | None) -> dict[str, int]:
    """Commands the Redis server ran so far, by name (``INFO commandstats``): exact per
    line only on a Redis nothing else uses."""
    if url is None:
        return {}
    import redis

    with redis.Redis.from_url(url, socket_timeout=10) as client:
        stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def print_profile(path: Path, lines: int, cpu: float, commands: dict[str, int]) -> None:
    """Per line: the store's round trips, and the Python time by library (own time).

    Counted from synchronous functions only: cProfile counts each resumption of a
    coroutine as a call."""
    stats = pstats.Stats(str(path))
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    print(f"profile        {lines} lines, skyroute CPU {cpu:.2f} s under cProfile "
          f"= {cpu / lines * 1e6:.0f} us per line (cProfile's own overhead included)")

    def calls(part: str, name: str, caller: str | None = None) -> int:
        found = 0
        for (file, _, func), (_, primitive, _, _, callers) in raw.items():
            if part in file and func == name:
                found += primitive if caller is None else sum(
                    v[1] if isinstance(v, tuple) else v
                    for (_, _, by), v in callers.items() if by == caller)
        return found

    conn = "redis/asyncio/connection.py"
    single = calls(conn, "pack_command", "send_command")
    pipelines = calls(conn, "pack_commands")
    if single or pipelines:
        print(f"  redis round trips: {(single + pipelines) / lines:.2f} per line "
              f"({single / lines:.2f} single commands, {pipelines / lines:.2f} pipelines "
              f"of {calls(conn, 'pack_command', 'pack_commands') / max(pipelines, 1):.1f} "
              f"commands); arguments encoded: "
              f"{calls('redis/_parsers/encoders.py', 'encode') / lines:.1f} per line")
    if commands:
        ran = sorted(((n, c) for n, c in commands.items() if c > 0), key=lambda kv: -kv[1])
        print("  commands the server ran per line: " + ", ".join(
            f"{name} {count / lines:.2f}" for name, count in ran))
    own: dict[str, float] = {}
    for (file, _, _), (_, _, tottime, _, _) in raw.items():
        lib = next((name for name in ("redis", "aiohttp", "structlog", "prometheus_client",
                                      "sqlite", "skyroute", "asyncio", "uvloop", "json",
                                      "yarl", "multidict") if name in file), "other")
        if "/wt/" in file or "/proxy/" in file or "/routing/" in file:
            lib = "skyroute"
        own[lib] = own.get(lib, 0.0) + tottime
    total = sum(own.values())
    print("  own time per line by where the code lives: " + ", ".join(
        f"{lib} {t / lines * 1e6:.0f} us" for lib, t in sorted(own.items(),
                                                                key=lambda kv: -kv[1])))
    print(f"  (profiled total {total / lines * 1e6:.0f} us per line)")
    stats.sort_stats("tottime").print_stats(25)


#: The issue's goal: interactive p99 while the lane drains, over interactive p99 alone.
INTERACTIVE_P99_GOAL = 1.10


async def busy_half(args: argparse.Namespace, client: openai.AsyncOpenAI, control: str,
                    ok_rate: float | None) -> None:
    """A batch drained while the upstream answers 503 every other half second."""
    lines = max(100, args.batch_lines // 20)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        async def flip() -> None:
            busy = False
            while True:
                busy = not busy
                await http.post(control, json={"mode": "error" if busy else "ok",
                                               "retry_after_s": 0.0})
                await asyncio.sleep(0.5)

        flipper = asyncio.create_task(flip())
        began = time.perf_counter()
        try:
            batch = await until_done(client, await start_batch(client, lines))
        finally:
            flipper.cancel()
            await asyncio.gather(flipper, return_exceptions=True)
            await http.post(control, json={"mode": "ok"})
    took = time.perf_counter() - began
    versus = f" ({lines / took / ok_rate:.2f}x the all-ok drain rate)" if ok_rate else ""
    print(f"busy half      {lines} lines, upstream 503 every other 0.5 s: completed "
          f"{batch.request_counts.completed} in {took:.1f} s = {lines / took:.0f} lines/s"
          f"{versus}")


def spawn(argv: list[str], core: int | None, nice: int = 0,
          log: Path | None = None, *, idle: bool = False) -> subprocess.Popen[str]:
    """Start ``argv`` on ``core`` at priority ``nice`` (``idle``: in the kernel's idle class);
    its stderr to ``log`` if given (a reader thread in this process would take the load
    generator's CPU and GIL)."""
    if core is not None and shutil.which("taskset"):
        argv = ["taskset", "-c", str(core), *argv]
    stderr = log.open("w") if log is not None else subprocess.PIPE

    def priority() -> None:
        if idle:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        elif nice:
            os.setpriority(os.PRIO_PROCESS, 0, nice)

    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, text=True,
                            preexec_fn=priority if idle or nice else None)


def start_upstream(args: argparse.Namespace, tmp: Path, core: int | None,
                   procs: list[subprocess.Popen[str]], *, idle: bool = False,
                   ) -> tuple[str, str]:
    """The stand-in upstream (``--upstream canned``: its answer replayed) on ``core``; its
    base URL and the stand-in's behaviour control URL (the busy phase)."""
    up = spawn([sys.executable, str(HERE / "_upstream.py"), UPSTREAM_KEY], core, args.nice,
               idle=idle)
    procs.append(up)
    url = read_url_line(up, "the stand-in upstream")
    control = url.removesuffix("/v1") + "/_standin/behaviour"
    if args.upstream == "canned":
        answers = tmp / f"answers-{up.pid}.json"
        record_answers(url, answers)
        canned = spawn([sys.executable, str(HERE / "_canned_upstream.py"), str(answers)],
                       core, args.nice, idle=idle)
        procs.append(canned)
        url = read_url_line(canned, "the canned upstream")
    return url, control


def own_redis(directory: str, core: int | None, nice: int,
              procs: list[subprocess.Popen[str]]) -> str:
    """Start a redis-server of this run's own (AOF, ``appendfsync everysec``) on a free
    port, on ``core``; its URL once it answers PING."""
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("--redis own: redis-server is not installed (apt-get install "
                         "redis-server)")
    port = free_port()
    server = spawn([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "yes", "--appendfsync", "everysec", "--dir", directory],
                   core, nice)
    procs.append(server)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    with redis.Redis.from_url(url, socket_timeout=1) as client:
        while True:
            try:
                client.ping()
                return url
            except redis.ConnectionError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {port} did not start") from None
                time.sleep(0.05)


def prioritise(nice: int) -> None:
    """This process (and what it starts next) at ``nice``, its session's autogroup too:
    with autogroups, nice values only order processes within one session."""
    os.setpriority(os.PRIO_PROCESS, 0, nice)
    with contextlib.suppress(OSError):
        Path("/proc/self/autogroup").write_text(str(nice))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--batch-lines", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=3200.0,
                        help="the steady accept phase's requests per second")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interactive phase: alone/beside rounds (pooled)")
    parser.add_argument("--interactive-rate", type=float, default=200.0,
                        help="synchronous requests per second beside a draining batch")
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES),
                        help="which phases to run (default: all, in this order)")
    parser.add_argument("--nice", type=int, default=0,
                        help="scheduling priority of skyroute, the stand-in and the load "
                             "generator (e.g. -10, as root): on a machine busy with other "
                             "work, closer to having the two cores to themselves")
    parser.add_argument("--redis", default=None, metavar="URL",
                        help="queue in this Redis (a prefix of its own) instead of SQLite; "
                             "'own': a redis-server of this run's own on skyroute's core, "
                             "where its CPU is skyroute's cost, not the load generator's")
    parser.add_argument("--profile", action="store_true",
                        help="run skyroute under cProfile while the batch phase's lines run; "
                             "print the store's round trips per line and where time goes")
    parser.add_argument("--upstream", choices=["standin", "canned"], default="standin",
                        help="canned: the stand-in's answer replayed by a bare asyncio protocol "
                             "(bench/_canned_upstream.py), a fraction of the CPU on the load "
                             "generator's core; not with the busy phase")
    parser.add_argument("--jobs-upstream", choices=["shared", "own"], default="own",
                        help="own (default): jobs go to a stand-in of their own (jobs.targets) "
                             "in the idle class on the load generator's core, as a remote "
                             "provider's work is not on skyroute's machine; shared: to the "
                             "clients' stand-in, whose core the load generator shares")
    parser.add_argument("--lane", default=None, metavar="YAML",
                        help="the jobs.lane setting, e.g. '{process: inline, cpu: 30%%}' "
                             "(default: skyroute's; --profile implies process: inline)")
    args = parser.parse_args(argv)
    if args.upstream == "canned" and "busy" in args.phases:
        parser.error("--upstream canned cannot answer busy: leave out the busy phase")
    lane = yaml.safe_load(args.lane or "{}")
    if not isinstance(lane, dict):
        parser.error(f"--lane {args.lane!r} is not a mapping such as '{{process: inline}}'")
    if args.profile:  # cProfile wraps the process it starts: the lane must run in it
        lane["process"] = "inline"
    two_cores = len(os.sched_getaffinity(0)) >= 2
    if args.nice:  # before anything starts: the session's autogroup covers them all
        prioritise(args.nice)
    procs: list[subprocess.Popen[str]] = []
    own = args.redis == "own"
    # A prefix of this run's own (a pid repeats after a reboot), deleted at the end.
    prefix = f"bench-{os.urandom(6).hex()}:"
    with tempfile.TemporaryDirectory(prefix="skyroute-bench-jobs-") as tmp:
        try:
            core0 = 0 if two_cores else None
            upstream, control = start_upstream(args, Path(tmp), core0, procs)
            jobs_upstream = None
            if args.jobs_upstream == "own":
                jobs_upstream, control = start_upstream(args, Path(tmp), core0, procs,
                                                        idle=True)
            if args.redis == "own":
                args.redis = own_redis(tmp, 1 if two_cores else None, args.nice, procs)
            args.redis_pid = local_redis_pid(args.redis)
            parked = socket.socket()  # listens, never accepts: connections just wait
            parked.bind(("127.0.0.1", 0))
            parked.listen(1024)
            config = Path(tmp) / "routing.yaml"
            config.write_text(
                f"listen: 127.0.0.1:0\nauth:\n  api_keys:\n    - {{name: bench, key: {KEY}}}\n"
                f"jobs:\n  data_dir: {tmp}/data\n  concurrency: 16\n"
                + (f"  redis: {{url: '{args.redis}', prefix: '{prefix}'}}\n"
                   if args.redis else "")
                + f"  lane: {json.dumps(lane)}\n"
                + ("  targets: {chat: [jobs-up]}\n" if jobs_upstream else "") +
                f"upstreams:\n  - name: up\n    url: {upstream}\n    api_key: {UPSTREAM_KEY}\n"
                "    models: {chat: deepseek-chat}\n"
                + (f"  - name: jobs-up\n    url: {jobs_upstream}\n    api_key: {UPSTREAM_KEY}\n"
                   "    models: {chat: deepseek-chat}\n" if jobs_upstream else "") +
                f"  - name: parked\n    url: http://127.0.0.1:{parked.getsockname()[1]}/v1\n"
                "    models: {parked: parked}\n    first_token_timeout: 1h\n"
                "    connect_timeout: 1h\nroutes:\n  - {model: parked, targets: [parked], "
                "timeout: 1h}\n  - {model: chat, targets: [up]}\n")
            log = Path(tmp) / "skyroute.log"
            args.profile_dir = Path(tmp) if args.profile else None
            main_of = (["-c", PROFILED, f"{tmp}/started", f"{tmp}/skyroute.prof"]
                       if args.profile else ["-m", "skyroute.proxy.cli"])
            sky = spawn([sys.executable, *main_of, "--log-format", "json",
                         "run", "--config", str(config), "--port", "0", "--workers", "1"],
                        1 if two_cores else None, args.nice, log=log)
            procs.append(sky)
            policy = load_config(config).jobs
            separate = policy is not None and policy.lane_process is LaneProcess.SEPARATE
            url = wait_for_listening(sky, log, None, timeout_s=START_TIMEOUT_S,
                                     event_name="workers_started" if separate else
                                     "server_started")
            processes = workers_of(log) if separate else Processes(sky.pid, (sky.pid,))
            if args.redis:
                print(f"redis: {args.redis}, {redis_keys(args.redis)} keys in its db before "
                      f"this run; this run's prefix {prefix}")
            print(f"queue: {'redis' if args.redis else 'sqlite'}; "
                  f"skyroute pids {processes}{' on core 1' if two_cores else ''}, "
                  f"{args.concurrency} clients, {args.duration:.0f} s per phase")
            if two_cores:  # the load generator on the stand-in's core, not skyroute's
                os.sched_setaffinity(0, {0})
            if args.nice:
                prioritise(args.nice)
            uvloop.run(run(args, url, processes, control))
        finally:
            for proc in procs:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:  # parked jobs hold its drain
                    proc.kill()
                    proc.wait(10)
            if args.redis and not own:  # the run's own Redis is gone with its data
                delete_prefix(args.redis, prefix)
    return 0


def workers_of(log: Path) -> Processes:
    """The serving worker and the jobs worker of a supervised skyroute, from its log."""
    event = logged_event(log, "workers_started")
    if event is None:
        raise RuntimeError("skyroute did not log workers_started")
    jobs = event["jobs_pid"]
    serving = next(p for p in event["pids"] if p != jobs)
    return Processes(serving, tuple(event["pids"]), jobs)


def local_redis_pid(url: str | None) -> int | None:
    """The pid of the Redis server at ``url`` if it runs on this machine (its CPU and its
    waits for a core are then read from /proc), else None."""
    if url is None:
        return None
    import redis

    with redis.Redis.from_url(url, socket_timeout=10) as client:
        pid = int(client.info("server")["process_id"])
    with contextlib.suppress(OSError):
        if "redis" in Path(f"/proc/{pid}/comm").read_text():
            return pid
    return None


def redis_keys(url: str) -> int:
    import redis

    with redis.Redis.from_url(url, socket_timeout=10) as client:
        return int(client.dbsize())


def delete_prefix(url: str, prefix: str) -> None:
    """Delete this run's keys (its jobs, batches, stream and counters)."""
    import redis

    with redis.Redis.from_url(url, socket_timeout=10) as client:
        batch = []
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            batch.append(key)
            if len(batch) == 1000:
                client.unlink(*batch)
                batch = []
        if batch:
            client.unlink(*batch)


if __name__ == "__main__":
    sys.exit(main())
