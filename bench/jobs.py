"""Benchmark: how fast skyroute accepts durable jobs, ingests batch lines and drains them.

One ``skyroute run --workers 1`` process (one core; pinned to core 1 with taskset when
there are two) with ``jobs:`` on SQLite, in front of the 0 ms stand-in
(``bench/_upstream.py``). In the same run:

* **sync baseline**: ``--concurrency`` clients send chat completions synchronously for
  ``--duration`` seconds (each answered by the upstream through skyroute);
* **async accept**: the same clients send the same body to ``/v1/async/chat/completions``
  for the same time: each answer is a 202 once the job is committed to disk (group
  commit, ``synchronous=FULL``). The lane drains the queue meanwhile, on the same core.
* **drain**: after the accept phase, how long the lane takes to run what is queued.
* **batch ingest**: a ``--batch-lines`` file is uploaded and a batch created; lines per
  second from create to ``in_progress`` (validated and queued) and to ``completed``.

Printed: requests per second and p50/p99 latency of each phase, the ratio async/sync, and
skyroute's own CPU seconds per phase (``/proc/<pid>/stat``), so "accepts per CPU second"
is a one-core figure that does not depend on how busy the machine is.

Usage: python bench/jobs.py [--duration 5] [--concurrency 64] [--batch-lines 10000]
                           [--rate 3200]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import uvloop

HERE = Path(__file__).resolve().parent
KEY = "sk-bench-client"
UPSTREAM_KEY = "sk-bench-upstream"
BODY = json.dumps({"model": "chat", "messages": [{"role": "user", "content": "hi"}]}).encode()
#: Routed to an upstream that never answers: its jobs wait in the lane (16 at most) and
#: use no CPU, so the accept phase measures accepting alone.
PARKED = json.dumps({"model": "parked", "messages": [{"role": "user", "content": "hi"}]}).encode()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


async def paced(url: str, *, duration: float, rate: float, body: bytes,
                expect: int = 202) -> list[float]:
    """Latencies (s) of requests sent at a steady ``rate`` (open loop), each timed from when
    it was due, so a stall counts for every request it delays."""
    latencies: list[float] = []
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    # Under skyroute's limits.max_client_connections (512), lane connections included.
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=30)) as http:
        async def one(due: float) -> None:
            async with http.post(url, data=body, headers=headers) as resp:
                await resp.read()
                if resp.status != expect:
                    raise RuntimeError(f"{url}: HTTP {resp.status}")
            latencies.append(time.perf_counter() - due)

        began = time.perf_counter()
        tasks = []
        for i in range(int(duration * rate)):
            due = began + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(due)))
        await asyncio.gather(*tasks)
    return latencies


def p99_ms(latencies: list[float]) -> float:
    return statistics.quantiles(latencies, n=100)[98] * 1000


async def run(args: argparse.Namespace, url: str, pid: int, control: str) -> None:
    cpu0 = cpu_seconds(pid)
    sync = await load(f"{url}/v1/chat/completions", duration=args.duration,
                      concurrency=args.concurrency, expect=200)
    cpu1 = cpu_seconds(pid)
    sync_rate = summary("sync", sync, args.duration, cpu1 - cpu0)
    accepted = await load(f"{url}/v1/async/chat/completions", duration=args.duration,
                          concurrency=args.concurrency, expect=202)
    cpu2 = cpu_seconds(pid)
    summary("async+drain", accepted, args.duration, cpu2 - cpu1)
    started = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        while not await queue_empty(http, url):
            await asyncio.sleep(0.1)
    drained = time.perf_counter() - started
    print(f"  drain: {len(accepted)} jobs run, the last {drained:.1f} s after the phase ended")
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0,
                                  timeout=60) as client:
        ok_rate = await batch_ingest(args, client)
        await interactive_impact(args, url, client)
        await busy_half(args, client, control, ok_rate)
    # Last: these jobs never finish (their upstream never answers), so nothing drains.
    cpu3 = cpu_seconds(pid)
    parked = await load(f"{url}/v1/async/chat/completions", duration=args.duration,
                        concurrency=args.concurrency, expect=202, body=PARKED)
    cpu4 = cpu_seconds(pid)
    async_rate = summary("async accept", parked, args.duration, cpu4 - cpu3)
    steady = await paced(f"{url}/v1/async/chat/completions", duration=args.duration,
                         rate=args.rate, body=PARKED)
    cpu5 = cpu_seconds(pid)
    summary(f"  at {args.rate:.0f}/s", steady, args.duration, cpu5 - cpu4)
    print(f"ratio async accept / sync: {async_rate / sync_rate:.2f}x "
          f"(goal: 3,200 accepts/s on one core, p99 < 10 ms)")


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


async def until_done(client: openai.AsyncOpenAI, batch_id: str) -> Any:
    while (batch := await client.batches.retrieve(batch_id)).status not in (
            "completed", "failed"):
        await asyncio.sleep(0.05)
    assert batch.status == "completed", batch
    return batch


async def batch_ingest(args: argparse.Namespace, client: openai.AsyncOpenAI) -> float:
    """Lines per second validated and queued, and run to the end (all upstream answers ok)."""
    began = time.perf_counter()
    batch_id = await start_batch(client, args.batch_lines)
    queued_at = None
    while (batch := await client.batches.retrieve(batch_id)).status not in (
            "completed", "failed"):
        await asyncio.sleep(0.05)
        if queued_at is None and batch.status != "validating":
            queued_at = time.perf_counter() - began
    total = time.perf_counter() - began
    assert queued_at is not None and batch.status == "completed", batch
    print(f"batch ingest   {args.batch_lines} lines validated and queued in {queued_at:.2f} s "
          f"= {args.batch_lines / queued_at:.0f} lines/s; completed in {total:.1f} s = "
          f"{args.batch_lines / total:.0f} lines/s")
    return args.batch_lines / total


async def interactive_impact(args: argparse.Namespace, url: str,
                             client: openai.AsyncOpenAI) -> None:
    """Paced interactive requests alone, then while a batch drains: their p99 either way."""
    chat = f"{url}/v1/chat/completions"
    alone = await paced(chat, duration=args.duration, rate=args.interactive_rate, body=BODY,
                        expect=200)
    batch_id = await start_batch(client, args.batch_lines)
    beside = await paced(chat, duration=args.duration, rate=args.interactive_rate, body=BODY,
                         expect=200)
    ran = (await client.batches.retrieve(batch_id)).request_counts.completed
    await until_done(client, batch_id)
    print(f"interactive    {args.interactive_rate:.0f}/s: p99 {p99_ms(alone):.2f} ms alone, "
          f"{p99_ms(beside):.2f} ms while a batch drains ({p99_ms(beside) / p99_ms(alone):.2f}x; "
          f"goal <= 1.10x); {ran / args.duration:.0f} lines/s drained meanwhile")


async def busy_half(args: argparse.Namespace, client: openai.AsyncOpenAI, control: str,
                    ok_rate: float) -> None:
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
    print(f"busy half      {lines} lines, upstream 503 every other 0.5 s: completed "
          f"{batch.request_counts.completed} in {took:.1f} s = {lines / took:.0f} lines/s "
          f"({lines / took / ok_rate:.2f}x the all-ok drain rate)")


def spawn(argv: list[str], core: int | None) -> subprocess.Popen[str]:
    if core is not None and shutil.which("taskset"):
        argv = ["taskset", "-c", str(core), *argv]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--batch-lines", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=3200.0,
                        help="the steady accept phase's requests per second")
    parser.add_argument("--interactive-rate", type=float, default=200.0,
                        help="synchronous requests per second beside a draining batch")
    parser.add_argument("--redis", default=None, metavar="URL",
                        help="queue in this Redis (a prefix of its own) instead of SQLite")
    args = parser.parse_args(argv)
    two_cores = len(os.sched_getaffinity(0)) >= 2
    procs: list[subprocess.Popen[str]] = []
    with tempfile.TemporaryDirectory(prefix="skyroute-bench-jobs-") as tmp:
        try:
            up = spawn([sys.executable, str(HERE / "_upstream.py"), UPSTREAM_KEY],
                       0 if two_cores else None)
            procs.append(up)
            assert up.stdout is not None
            upstream = json.loads(up.stdout.readline())["url"]
            parked = socket.socket()  # listens, never accepts: connections just wait
            parked.bind(("127.0.0.1", 0))
            parked.listen(1024)
            config = Path(tmp) / "routing.yaml"
            config.write_text(
                f"listen: 127.0.0.1:0\nauth:\n  api_keys:\n    - {{name: bench, key: {KEY}}}\n"
                f"jobs:\n  data_dir: {tmp}/data\n  concurrency: 16\n"
                + (f"  redis: {{url: '{args.redis}', prefix: 'bench-{os.getpid()}:'}}\n"
                   if args.redis else "") +
                f"upstreams:\n  - name: up\n    url: {upstream}\n    api_key: {UPSTREAM_KEY}\n"
                "    models: {chat: deepseek-chat}\n"
                f"  - name: parked\n    url: http://127.0.0.1:{parked.getsockname()[1]}/v1\n"
                "    models: {parked: parked}\n    first_token_timeout: 1h\n"
                "    connect_timeout: 1h\nroutes:\n  - {model: parked, targets: [parked], "
                "timeout: 1h}\n")
            sky = spawn([sys.executable, "-m", "skyroute.proxy.cli", "--log-format", "json",
                         "run", "--config", str(config), "--port", "0", "--workers", "1"],
                        1 if two_cores else None)
            procs.append(sky)
            assert sky.stderr is not None
            while not (match := re.search(r'"url": "(http://[^"]+)"', sky.stderr.readline())):
                if sky.poll() is not None:
                    raise RuntimeError("skyroute did not start")
            # Keep its log (one access line per request) flowing, or its pipe fills.
            threading.Thread(target=sky.stderr.read, daemon=True).start()
            print(f"queue: {'redis' if args.redis else 'sqlite'}; "
                  f"skyroute pid {sky.pid}{' on core 1' if two_cores else ''}, "
                  f"{args.concurrency} clients, {args.duration:.0f} s per phase")
            control = upstream.removesuffix("/v1") + "/_standin/behaviour"
            uvloop.run(run(args, match.group(1), sky.pid, control))
        finally:
            for proc in procs:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:  # parked jobs hold its drain
                    proc.kill()
                    proc.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
