"""Benchmark: what skyroute adds on top of a 0 ms upstream, next to a bare pass-through.

Starts three processes on 127.0.0.1 (each on a free port):
* the stand-in upstream (``bench/_upstream.py``, ttft 0, token delay 0), pinned to core 0,
* a bare 40-line aiohttp+uvloop pass-through proxy (``bench/_passthrough.py``), core 1,
* skyroute (``skyroute run --workers 1``, one upstream, one API key), core 1,
and drives them from this process (pinned to core 0): an aiohttp+uvloop load generator with
keep-alive connections at concurrency 1 and 64, non-streaming and streaming chat completions,
against the upstream directly, through the bare pass-through and through skyroute.

Then, in the same run, the scaling part (``--no-scaling`` skips it, ``--only-scaling`` runs
it alone): nothing pinned (load generator, upstream and proxies share every core), skyroute
``--workers 1`` and ``--workers 2`` at the highest concurrency, each measured the same way,
driven by ``wrk`` when it is on PATH (``--load-generator``; ``apt-get install wrk``): this
Python load generator costs about what a worker does per request, so on two cores it, not
skyroute, would cap the ratio. Printed: throughput of two workers over one, CPU per request
(supervisor and workers together) of two over one, the CPU per request of the upstream and of
the load generator and their share, the cores the rest of the machine used meanwhile (noise),
statesync messages and bytes the workers sent each other per request, and the ceiling: the
most two workers can serve over one given those costs.

Each phase (mode x concurrency x target) is warmed up, then bounded by ``--requests`` and
``--seconds``. Printed: requests/s, p50/p99 latency (to the last byte), the p50/p99 added by
each proxy vs direct, skyroute's throughput as a share of the bare pass-through's, and the
proxy process's CPU seconds per 1000 requests (utime+stime from /proc/PID/stat), because at 64
connections the load generator and the upstream may saturate core 0 and hide proxy cost.

Goals (issue 14), each against the bare pass-through in the same run: added p50 at
concurrency 1 within 0.05 ms of its; time to the first streamed byte within 0.3 ms of its;
throughput at the top concurrency >= 90 % of its (JSON and SSE); proxy CPU per request <= 1.2x
its; two workers >= 1.4x one worker's throughput at the same CPU per request.

Usage: python bench/overhead.py [--requests 6000] [--seconds 6] [--warmup 1]
                                [--concurrency 1 64] [--json FILE] [--short] [--no-scaling]
                                [--only-scaling] [--load-generator auto|wrk|aiohttp]

``--short`` (for CI: about a minute) measures far fewer requests per phase; its ratios are
rougher but the same ones.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CLIENT_KEY = "sk-bench-client"
UPSTREAM_KEY = "sk-bench-upstream"
LOAD_CORE, PROXY_CORE = 0, 1
TARGETS = ("direct", "bare", "skyroute")
#: The scaling part: skyroute with one and with two workers, nothing pinned.
SCALING_TARGETS = ("sky-w1", "sky-w2")
#: Goals from issue 14 for the scaling part: two workers' throughput over one worker's.
WORKERS_THROUGHPUT_GOAL = 1.4
MODES = ("json", "stream")
START_TIMEOUT_S = 20.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Goals of issue 14, each against the bare pass-through in the same run: added p50 at
# concurrency 1 within 0.05 ms of its added p50; time to the first streamed byte (p50, at
# concurrency 1) within 0.3 ms of its; throughput at the top concurrency at least 90 % of
# its; proxy CPU per request at most 1.2x its.
P50_GOAL_MS = 0.05
TTFB_GOAL_MS = 0.3
THROUGHPUT_GOAL = 0.90
CPU_GOAL = 1.2


@dataclass
class Phase:
    mode: str
    concurrency: int
    target: str
    requests: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    ttfb_p50_ms: float | None  # streams: request sent to the first body byte
    proxy_cpu_s: float | None  # CPU seconds the proxy process used during the phase
    proxy_cpu_s_per_1k: float | None
    loadgen_cpu_s: float  # this process (load generator), for context


# ----------------------------------------------------------------------------- processes


class Procs:
    """The child processes; ``stop()`` ends every one of them (also on errors / Ctrl-C)."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.stopped: set[str] = set()
        self.lifelines: list[int] = []  # pipe ends that keep hand-started workers alive
        self.tmp = Path(tempfile.mkdtemp(prefix="skyroute-bench-"))

    def spawn(self, name: str, argv: list[str], *, core: int | None,
              env: dict[str, str] | None = None, **kw: Any) -> subprocess.Popen[bytes]:
        if core is not None and shutil.which("taskset"):
            argv = ["taskset", "-c", str(core), *argv]
        env = {**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                start_new_session=True, **kw)
        self.procs.append((name, proc))
        return proc

    def stop_one(self, name: str) -> None:
        """Stop the process ``name`` (SIGTERM; its drain is short: --grace 1)."""
        for each, proc in self.procs:
            if each == name and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.stopped.add(name)

    def stop(self) -> None:
        for _, proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        for _, proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)
        for fd in self.lifelines:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.lifelines.clear()


def read_url_line(proc: subprocess.Popen[Any], name: str) -> str:
    """The ``{"url": ...}`` line a helper prints on stdout once it listens."""
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the helpers print exactly one line, at once
    if not line:
        raise RuntimeError(f"{name} exited before listening (exit status {proc.wait()})")
    return str(json.loads(line)["url"])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_listening(proc: subprocess.Popen[Any], log: Path, port: int | None,
                       event_name: str = "server_started", *,
                       timeout_s: float = START_TIMEOUT_S) -> str:
    """skyroute logs ``{"url": ..., "event": "server_started"}`` on stderr (a file here;
    ``workers_started`` from a supervisor); with ``port`` (log level above info: no such
    line), wait until it accepts connections. Every benchmark waits for skyroute here."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"skyroute exited with status {proc.returncode}:\n"
                               + log.read_text()[-3000:])
        if port is not None:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                return f"http://127.0.0.1:{port}"
        event = logged_event(log, event_name)
        if event is not None:
            return str(event["url"])
        time.sleep(0.05)
    raise RuntimeError("skyroute did not log 'server_started' in time:\n"
                       + log.read_text()[-3000:])


def logged_event(log: Path, event_name: str) -> dict[str, Any] | None:
    """The first ``event_name`` line skyroute wrote to ``log`` (JSON logs), if any yet."""
    for line in log.read_text().splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict) and event.get("event") == event_name:
                return event
    return None


def routing_yaml(upstream_url: str) -> str:
    return (f"listen: 127.0.0.1:0\n"
            f"auth:\n  api_keys:\n    - name: bench\n      key: {CLIENT_KEY}\n"
            f"upstreams:\n  - name: bench\n    url: {upstream_url}\n"
            f"    api_key: {UPSTREAM_KEY}\n    region: local\n"
            f"    models: {{chat: deepseek-chat}}\n")


def cpu_seconds(pids: tuple[int, ...]) -> float:
    """utime + stime of processes (all their threads), from /proc/PID/stat."""
    total = 0.0
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14, 15 of stat(5)
    return total


def memory_mib(pids: tuple[int, ...], field: str) -> list[float]:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of each process, in MiB, from /proc/PID/status."""
    out = []
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                out.append(int(line.split()[1]) / 1024)
    return out


def memory_line(targets: list[Target], idle: dict[str, list[float]]) -> str:
    """Idle and peak RSS of each proxy process (issue 14's goal: at most 80 MB per worker)."""
    parts = [f"{t.name} idle {'/'.join(f'{m:.1f}' for m in idle[t.name])} MiB, peak "
             f"{'/'.join(f'{m:.1f}' for m in memory_mib(t.pids, 'VmHWM'))} MiB"
             for t in targets if t.pids]
    return "RSS per process (goal: <= 80 MB = 76.3 MiB per worker): " + "; ".join(parts)


def worker_pids(supervisor: int) -> tuple[int, ...]:
    """The child processes (workers) of a ``--workers N`` supervisor, from /proc."""
    with contextlib.suppress(OSError):
        text = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text()
        return tuple(int(pid) for pid in text.split())
    return ()


def listens(pid: int, url: str) -> bool:
    """Whether process ``pid`` has a listening socket on ``url``'s port (/proc/net/tcp*)."""
    port = f"{int(url.rsplit(':', 1)[1]):04X}"
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                # local address "IP:PORT", state 0A = LISTEN, inode
                if fields[1].endswith(":" + port) and fields[3] == "0A" and fields[9] in inodes:
                    return True
    return False


# ----------------------------------------------------------------------------- load


@dataclass(frozen=True)
class Target:
    name: str
    url: str  # ends in /v1/chat/completions
    key: str
    model: str
    pids: tuple[int, ...]  # the proxy processes whose CPU is measured


def body_for(model: str, stream: bool) -> bytes:
    return json.dumps({"model": model, "stream": stream, "max_tokens": 16, "messages": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Say hello in five words."}]}).encode()


async def run_phase(session: aiohttp.ClientSession, target: Target, *, stream: bool,
                    concurrency: int, max_requests: int, max_seconds: float,
                    first_bytes: list[float] | None = None,
                    ) -> tuple[list[float], int, float]:
    """Run ``concurrency`` workers until ``max_requests`` are done or ``max_seconds`` pass.

    Returns (latencies in seconds, errors, elapsed seconds); the time to each stream's first
    body byte goes into ``first_bytes``.
    """
    body = body_for(target.model, stream)
    headers = {"Authorization": f"Bearer {target.key}", "Content-Type": "application/json"}
    latencies: list[float] = []
    errors = 0
    issued = 0
    perf = time.perf_counter
    deadline = perf() + max_seconds

    async def worker() -> None:
        nonlocal errors, issued
        while issued < max_requests and perf() < deadline:
            issued += 1
            t0 = perf()
            try:
                async with session.post(target.url, data=body, headers=headers) as resp:
                    if stream:
                        tail = b""
                        first = 0.0
                        async for chunk in resp.content.iter_any():
                            first = first or perf()
                            tail = chunk
                        ok = resp.status == 200 and tail.endswith(b"data: [DONE]\n\n")
                        if ok and first_bytes is not None:
                            first_bytes.append(first - t0)
                    else:
                        ok = resp.status == 200 and b'"choices"' in await resp.read()
            except (TimeoutError, aiohttp.ClientError):
                ok = False
            if ok:
                latencies.append(perf() - t0)
            else:
                errors += 1
                if errors == 1:
                    print(f"  ! first error on {target.name} ({'stream' if stream else 'json'})",
                          file=sys.stderr)

    t_start = perf()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors, perf() - t_start


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    idx = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[idx]


async def measure(targets: list[Target], args: argparse.Namespace) -> list[Phase]:
    """Every (mode, concurrency): ``--rounds`` rounds, each giving every target a slice of
    ``--requests``/``--seconds`` in turn, so that noise from elsewhere on the machine is
    spread over all targets alike; one warm-up per target first."""
    phases: list[Phase] = []
    timeout = aiohttp.ClientTimeout(total=30)
    rounds = max(1, args.rounds)
    for mode in args.modes:
        stream = mode == "stream"
        for conc in args.concurrency:
            sessions = {t.name: aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=conc), timeout=timeout) for t in targets}
            acc: dict[str, dict[str, Any]] = {
                t.name: {"lat": [], "first": [], "errors": 0, "elapsed": 0.0, "cpu": 0.0,
                         "own": 0.0}
                for t in targets}
            try:
                for t in targets:
                    await run_phase(sessions[t.name], t, stream=stream, concurrency=conc,
                                    max_requests=args.warmup_requests, max_seconds=args.warmup)
                for _ in range(rounds):
                    for t in targets:
                        a = acc[t.name]
                        cpu0 = cpu_seconds(t.pids)
                        own0 = time.process_time()
                        lat, errors, elapsed = await run_phase(
                            sessions[t.name], t, stream=stream, concurrency=conc,
                            max_requests=max(1, args.requests // rounds),
                            max_seconds=args.seconds / rounds, first_bytes=a["first"])
                        a["own"] += time.process_time() - own0
                        a["cpu"] += cpu_seconds(t.pids) - cpu0
                        a["lat"] += lat
                        a["errors"] += errors
                        a["elapsed"] += elapsed
            finally:
                for s in sessions.values():
                    await s.close()
            for t in targets:
                a = acc[t.name]
                lat, n, elapsed = sorted(a["lat"]), len(a["lat"]), a["elapsed"]
                cpu = a["cpu"] if t.pids else None
                phase = Phase(
                    mode=mode, concurrency=conc, target=t.name, requests=n,
                    errors=a["errors"], seconds=round(elapsed, 3),
                    rps=n / elapsed if elapsed else 0.0,
                    p50_ms=percentile(lat, 0.50) * 1e3, p99_ms=percentile(lat, 0.99) * 1e3,
                    mean_ms=statistics.fmean(lat) * 1e3 if lat else float("nan"),
                    ttfb_p50_ms=(percentile(sorted(a["first"]), 0.50) * 1e3
                                 if a["first"] else None),
                    proxy_cpu_s=cpu,
                    proxy_cpu_s_per_1k=cpu / n * 1000 if cpu is not None and n else None,
                    loadgen_cpu_s=a["own"])
                phases.append(phase)
                cpu_txt = (f"  proxy CPU {phase.proxy_cpu_s_per_1k:6.3f} s/1k"
                           if phase.proxy_cpu_s_per_1k is not None else "")
                print(f"  {mode:6} c={conc:<3} {t.name:8} {n:6d} req {phase.rps:8.0f}/s "
                      f"p50 {phase.p50_ms:7.3f} ms p99 {phase.p99_ms:7.3f} ms{cpu_txt}"
                      f"{f'  ERRORS {phase.errors}' if phase.errors else ''}", file=sys.stderr)
    return phases


# ----------------------------------------------------------------------------- report


def report(phases: list[Phase], args: argparse.Namespace) -> dict[str, Any]:
    by = {(p.mode, p.concurrency, p.target): p for p in phases}
    out: list[str] = []
    w = out.append

    def fmt(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    w("")
    w("skyroute overhead benchmark (upstream: stand-in, ttft 0, token delay 0, "
      f"{args.tokens} tokens; latency = request to last byte)")
    w(f"cores: load generator + upstream on {LOAD_CORE}, proxies on {PROXY_CORE}; "
      f"per phase: <= {args.requests} requests / {args.seconds} s in {args.rounds} "
      f"interleaved rounds, after {args.warmup} s warm-up")
    w("")
    w(f"{'mode':6} {'conc':>4} {'target':9} {'requests':>8} {'errors':>6} {'req/s':>8} "
      f"{'p50 ms':>8} {'p99 ms':>8} {'1st byte p50':>12} {'proxy CPU s/1k req':>19}")
    w("-" * 97)
    for p in phases:
        w(f"{p.mode:6} {p.concurrency:>4} {p.target:9} {p.requests:>8} {p.errors:>6} "
          f"{p.rps:>8.0f} {p.p50_ms:>8.3f} {p.p99_ms:>8.3f} {fmt(p.ttfb_p50_ms, '.3f'):>12} "
          f"{fmt(p.proxy_cpu_s_per_1k, '.3f'):>19}")

    w("")
    w("Added latency vs direct, throughput and CPU of skyroute vs the bare pass-through")
    w(f"{'mode':6} {'conc':>4} {'bare +p50':>10} {'bare +p99':>10} {'sky +p50':>10} "
      f"{'sky +p99':>10} {'rps sky/direct':>15} {'rps sky/bare':>13} "
      f"{'CPU/req sky/bare':>17}")
    w("-" * 102)
    summary: list[dict[str, Any]] = []
    verdicts: list[str] = []
    for mode in args.modes:
        for conc in args.concurrency:
            d, b, s = (by.get((mode, conc, t)) for t in TARGETS)
            if not (d and b and s):
                continue
            row = {
                "mode": mode, "concurrency": conc,
                "bare_added_p50_ms": b.p50_ms - d.p50_ms, "bare_added_p99_ms": b.p99_ms - d.p99_ms,
                "skyroute_added_p50_ms": s.p50_ms - d.p50_ms,
                "skyroute_added_p99_ms": s.p99_ms - d.p99_ms,
                "throughput_ratio_skyroute_vs_direct": s.rps / d.rps if d.rps else None,
                "throughput_ratio_skyroute_vs_bare": s.rps / b.rps if b.rps else None,
                "cpu_per_request_ratio_skyroute_vs_bare":
                    (s.proxy_cpu_s_per_1k / b.proxy_cpu_s_per_1k
                     if s.proxy_cpu_s_per_1k and b.proxy_cpu_s_per_1k else None),
            }
            summary.append(row)
            w(f"{mode:6} {conc:>4} {row['bare_added_p50_ms']:>+10.3f} "
              f"{row['bare_added_p99_ms']:>+10.3f} {row['skyroute_added_p50_ms']:>+10.3f} "
              f"{row['skyroute_added_p99_ms']:>+10.3f} "
              f"{fmt(row['throughput_ratio_skyroute_vs_direct'], '.1%'):>15} "
              f"{fmt(row['throughput_ratio_skyroute_vs_bare'], '.1%'):>13} "
              f"{fmt(row['cpu_per_request_ratio_skyroute_vs_bare'], '.2f'):>17}")
            if conc == 1:
                over = row["skyroute_added_p50_ms"] - row["bare_added_p50_ms"]
                verdicts.append(f"{'PASS' if over <= P50_GOAL_MS else 'FAIL'}  {mode:6} c=1   "
                                f"skyroute added p50 {row['skyroute_added_p50_ms']:.3f} ms, "
                                f"{over:+.3f} ms over the bare pass-through's "
                                f"{row['bare_added_p50_ms']:.3f} ms (goal <= +{P50_GOAL_MS} ms)")
                if mode == "stream" and s.ttfb_p50_ms is not None and b.ttfb_p50_ms is not None:
                    row["skyroute_ttfb_p50_ms"] = s.ttfb_p50_ms
                    row["bare_ttfb_p50_ms"] = b.ttfb_p50_ms
                    over = s.ttfb_p50_ms - b.ttfb_p50_ms
                    verdicts.append(f"{'PASS' if over <= TTFB_GOAL_MS else 'FAIL'}  {mode:6} "
                                    f"c=1   first streamed byte p50 {s.ttfb_p50_ms:.3f} ms, "
                                    f"{over:+.3f} ms over the bare pass-through's "
                                    f"{b.ttfb_p50_ms:.3f} ms (goal <= +{TTFB_GOAL_MS} ms)")
            cpu_ratio = row["cpu_per_request_ratio_skyroute_vs_bare"]
            if cpu_ratio is not None:
                verdicts.append(f"{'PASS' if cpu_ratio <= CPU_GOAL else 'FAIL'}  {mode:6} "
                                f"c={conc:<3} proxy CPU per request {cpu_ratio:.2f}x the bare "
                                f"pass-through's (goal <= {CPU_GOAL}x)")
            if conc == max(args.concurrency) and conc > 1:
                ratio = row["throughput_ratio_skyroute_vs_bare"] or 0.0
                goal = THROUGHPUT_GOAL
                ok = ratio >= goal
                # If core 0 (load generator + upstream) is the bottleneck, both proxies serve
                # about the same rate; the CPU cost per request then shows what each would
                # serve on its own core: 1/cpu_ratio.
                cpu_note = (f"; CPU/req {cpu_ratio:.2f}x bare -> ~{1 / cpu_ratio:.0%} of "
                            "its throughput when CPU-bound" if cpu_ratio else "")
                verdicts.append(f"{'PASS' if ok else 'FAIL'}  {mode:6} c={conc:<3} "
                                f"throughput {ratio:.1%} of bare (goal >= {goal:.0%})"
                                f"{cpu_note}")
    w("")
    w("(+p50/+p99: ms added vs the upstream hit directly at the same mode and concurrency;"
      " rps sky/direct, sky/bare: skyroute's requests/s over the upstream's hit directly and"
      " over the bare pass-through's; CPU/req sky/bare:"
      " proxy CPU seconds per request, skyroute over bare)")
    w("")
    w("Goals (issue 14)")
    out.extend(verdicts)
    print("\n".join(out), flush=True)
    return {"phases": [asdict(p) for p in phases], "summary": summary, "verdicts": verdicts}


# ----------------------------------------------------------------------------- scaling

#: wrk's Lua script: the request, and a one-line JSON summary when done.
WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{{"requests": %d, "us": %d, "errors": %d, "p50_us": %d, "p99_us": %d}}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout + e.status,
    latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass
class Load:
    """One slice of load on one target, and what every process spent meanwhile."""

    requests: int
    errors: int
    seconds: float
    latencies: list[float]  # seconds; wrk reports only p50/p99 (``p50_s``/``p99_s``)
    p50_s: float | None
    p99_s: float | None
    loadgen_cpu_s: float


def _lua_quote(data: bytes) -> str:
    return '"' + data.decode().replace("\\", "\\\\").replace('"', '\\"') + '"'


def run_wrk(target: Target, *, stream: bool, concurrency: int, seconds: float,
            tmp: Path) -> Load:
    """``wrk`` (one thread, ``concurrency`` connections) for ``seconds``; its CPU from
    ``wait4`` (the kernel's count for the exited child)."""
    script = tmp / f"wrk-{target.name}-{'stream' if stream else 'json'}.lua"
    script.write_text(WRK_SCRIPT.format(body=_lua_quote(body_for(target.model, stream)),
                                        key=target.key))
    proc = subprocess.Popen(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
         "-s", str(script), target.url], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    line = next((x for x in out.decode().splitlines() if x.startswith("{")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {err.decode()[-500:]}"
                           f"{out.decode()[-500:]}")
    summary = json.loads(line)
    return Load(requests=summary["requests"] - summary["errors"], errors=summary["errors"],
                seconds=summary["us"] / 1e6, latencies=[], p50_s=summary["p50_us"] / 1e6,
                p99_s=summary["p99_us"] / 1e6, loadgen_cpu_s=usage.ru_utime + usage.ru_stime)


def run_aiohttp(target: Target, *, stream: bool, concurrency: int, seconds: float,
                requests: int) -> Load:
    """This process as the load generator (``run_phase``), with its own CPU time."""

    async def slice_() -> tuple[list[float], int, float]:
        async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=concurrency),
                timeout=aiohttp.ClientTimeout(total=30)) as session:
            return await run_phase(session, target, stream=stream, concurrency=concurrency,
                                   max_requests=requests, max_seconds=seconds)

    own0 = time.process_time()
    lat, errors, elapsed = uvloop.run(slice_())
    return Load(requests=len(lat), errors=errors, seconds=elapsed, latencies=lat, p50_s=None,
                p99_s=None, loadgen_cpu_s=time.process_time() - own0)


def record_answers(upstream_url: str, path: Path) -> None:
    """The stand-in's answers to the bench's JSON and streamed requests, for
    ``bench/_canned_upstream.py`` to replay (same bytes, a fraction of the CPU)."""
    recorded: dict[str, Any] = {}
    for stream in (False, True):
        request = urllib.request.Request(
            upstream_url + "/chat/completions", data=body_for("deepseek-chat", stream),
            headers={"Authorization": f"Bearer {UPSTREAM_KEY}",
                     "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as resp:
            body = resp.read().decode("latin-1")
        if stream:
            recorded["events"] = [e + "\n\n" for e in body.split("\n\n") if e]
        else:
            recorded["json"] = body
    path.write_text(json.dumps(recorded))


def busy_cpu_s() -> float:
    """CPU seconds every core of the machine spent busy so far (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / CLK_TCK  # user..steal (guest is inside user)


def sync_sent(target: Target) -> tuple[float, float]:
    """statesync messages and bytes sent so far by all of ``target``'s workers (/metrics)."""
    url = target.url.removesuffix("/v1/chat/completions") + "/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    messages = sum(float(m[1]) for m in re.finditer(
        r'^skyroute_sync_messages_total\{direction="out"[^}]*\} (\S+)$', text, re.M))
    sent = sum(float(m[1]) for m in re.finditer(
        r'^skyroute_sync_bytes_total\{direction="out"\} (\S+)$', text, re.M))
    return messages, sent


@dataclass
class ScalingPhase:
    mode: str
    concurrency: int
    target: str
    load_generator: str
    requests: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    proxy_cpu_ms_per_req: float  # supervisor and workers
    upstream_cpu_ms_per_req: float
    loadgen_cpu_ms_per_req: float
    other_cpu_cores: float  # what the rest of the machine used meanwhile, in cores (noise)
    sync_messages_per_req: float
    sync_bytes_per_req: float
    cpu_split: list[float]  # each process's share of the proxy CPU (supervisor first)


def measure_scaling(targets: list[Target], upstream_pid: int, args: argparse.Namespace,
                    tmp: Path) -> list[ScalingPhase]:
    """Every mode at the top concurrency: warm-up, then ``--rounds`` rounds giving each
    target a slice in turn; CPU of the proxy, the upstream, the load generator and the
    rest of the machine, and statesync messages sent, per slice."""
    conc = max(args.concurrency)
    rounds = max(1, args.rounds)
    out = []
    for mode in args.modes:
        stream = mode == "stream"

        def load(t: Target, seconds: float, requests: int, *, stream: bool = stream) -> Load:
            if args.load_generator == "wrk":
                return run_wrk(t, stream=stream, concurrency=conc, seconds=seconds, tmp=tmp)
            return run_aiohttp(t, stream=stream, concurrency=conc, seconds=seconds,
                               requests=requests)

        acc = {t.name: {"n": 0, "errors": 0, "s": 0.0, "lat": [], "p50": [], "p99": [],
                        "proxy": 0.0, "up": 0.0, "gen": 0.0, "busy": 0.0, "msgs": 0.0,
                        "bytes": 0.0, "each": [0.0] * len(t.pids)} for t in targets}
        for t in targets:
            load(t, args.warmup, args.warmup_requests)
        for _ in range(rounds):
            for t in targets:
                a = acc[t.name]
                m0, b0 = sync_sent(t)
                each0 = [cpu_seconds((pid,)) for pid in t.pids]
                busy0, cpu0, up0 = busy_cpu_s(), sum(each0), cpu_seconds((upstream_pid,))
                got = load(t, args.seconds / rounds, max(1, args.requests // rounds))
                each1 = [cpu_seconds((pid,)) for pid in t.pids]
                busy1, cpu1, up1 = busy_cpu_s(), sum(each1), cpu_seconds((upstream_pid,))
                a["each"] = [x + b - e for x, b, e in zip(a["each"], each1, each0, strict=True)]
                m1, b1 = sync_sent(t)
                a["n"] += got.requests
                a["errors"] += got.errors
                a["s"] += got.seconds
                a["lat"] += got.latencies
                if got.p50_s is not None and got.p99_s is not None:
                    a["p50"].append(got.p50_s)
                    a["p99"].append(got.p99_s)
                a["proxy"] += cpu1 - cpu0
                a["up"] += up1 - up0
                a["gen"] += got.loadgen_cpu_s
                a["busy"] += busy1 - busy0
                a["msgs"] += m1 - m0
                a["bytes"] += b1 - b0
        for t in targets:
            a = acc[t.name]
            n = max(1, a["n"])
            lat = sorted(a["lat"])
            p50 = percentile(lat, 0.5) if lat else statistics.median(a["p50"] or [math.nan])
            p99 = percentile(lat, 0.99) if lat else max(a["p99"] or [math.nan])
            ours = a["proxy"] + a["up"] + a["gen"]
            phase = ScalingPhase(
                mode=mode, concurrency=conc, target=t.name, load_generator=args.load_generator,
                requests=a["n"], errors=a["errors"], seconds=round(a["s"], 3),
                rps=a["n"] / a["s"] if a["s"] else 0.0, p50_ms=p50 * 1e3, p99_ms=p99 * 1e3,
                proxy_cpu_ms_per_req=a["proxy"] / n * 1e3,
                upstream_cpu_ms_per_req=a["up"] / n * 1e3,
                loadgen_cpu_ms_per_req=a["gen"] / n * 1e3,
                other_cpu_cores=max(0.0, a["busy"] - ours) / a["s"] if a["s"] else 0.0,
                sync_messages_per_req=a["msgs"] / n, sync_bytes_per_req=a["bytes"] / n,
                cpu_split=[x / max(1e-9, a["proxy"]) for x in a["each"]])
            out.append(phase)
            split = "/".join(f"{x:.0%}" for x in phase.cpu_split)
            print(f"  {mode:6} c={conc:<3} {t.name:8} {a['n']:6d} req {phase.rps:8.0f}/s "
                  f"proxy {phase.proxy_cpu_ms_per_req:.3f} ms/req (split {split}), upstream "
                  f"{phase.upstream_cpu_ms_per_req:.3f}, {args.load_generator} "
                  f"{phase.loadgen_cpu_ms_per_req:.3f}, others {phase.other_cpu_cores:.2f} "
                  f"cores{f'  ERRORS {phase.errors}' if phase.errors else ''}",
                  file=sys.stderr)
    return out


def scaling_ceiling(p: ScalingPhase, cores: float) -> float:
    """The most two workers can serve over one here, given what one request costs the
    proxy (P), the upstream (U) and the load generator (L), each process at most one
    core, all of them ``cores``: min(2/P, 1/U, 1/L, cores/(P+U+L)) over the same with 1/P."""
    proxy, up, gen = p.proxy_cpu_ms_per_req, p.upstream_cpu_ms_per_req, p.loadgen_cpu_ms_per_req
    if not proxy:
        return math.nan
    shared = [1 / up if up else math.inf, 1 / gen if gen else math.inf,
              cores / (proxy + up + gen)]
    return min(2 / proxy, *shared) / min(1 / proxy, *shared)


def report_scaling(phases: list[ScalingPhase], args: argparse.Namespace
                   ) -> list[dict[str, Any]]:
    """Two workers over one, measured the same way (nothing pinned)."""
    cores = len(os.sched_getaffinity(0))
    by = {(p.mode, p.target): p for p in phases}
    out = ["", "Scaling: skyroute --workers 2 over --workers 1 (nothing pinned: load generator "
           f"({args.load_generator}), upstream ({args.scaling_upstream}) and skyroute share "
           f"the {cores} cores)",
           f"{'mode':6} {'conc':>4} {'target':7} {'req/s':>7} {'p50 ms':>7} "
           f"{'CPU ms/req':>10} {'upstream':>9} {'loadgen':>8} {'harness %':>9} "
           f"{'others':>7} {'sync msg/req':>12} {'sync B/req':>10}", "-" * 105]
    for p in phases:
        harness = (p.upstream_cpu_ms_per_req + p.loadgen_cpu_ms_per_req) / max(
            1e-9, p.proxy_cpu_ms_per_req + p.upstream_cpu_ms_per_req + p.loadgen_cpu_ms_per_req)
        out.append(f"{p.mode:6} {p.concurrency:>4} {p.target:7} {p.rps:>7.0f} {p.p50_ms:>7.2f} "
                   f"{p.proxy_cpu_ms_per_req:>10.3f} {p.upstream_cpu_ms_per_req:>9.3f} "
                   f"{p.loadgen_cpu_ms_per_req:>8.3f} {harness:>9.0%} "
                   f"{p.other_cpu_cores:>7.2f} {p.sync_messages_per_req:>12.4f} "
                   f"{p.sync_bytes_per_req:>10.1f}")
    out += ["", f"{'mode':6} {'rps w2/w1':>10} {'CPU/req w2/w1':>14} {'ceiling quiet':>14} "
            f"{'ceiling now':>12}"]
    rows = []
    verdicts = []
    for mode in args.modes:
        one, two = by.get((mode, "sky-w1")), by.get((mode, "sky-w2"))
        if not (one and two and one.rps and one.proxy_cpu_ms_per_req):
            continue
        row = {"mode": mode, "concurrency": one.concurrency, "rps_w1": one.rps,
               "rps_w2": two.rps, "throughput_ratio_w2_vs_w1": two.rps / one.rps,
               "cpu_per_request_ratio_w2_vs_w1":
                   two.proxy_cpu_ms_per_req / one.proxy_cpu_ms_per_req,
               "ceiling_w2_vs_w1": scaling_ceiling(one, cores),
               # the cores the rest of the machine left free while these ran
               "ceiling_w2_vs_w1_now": scaling_ceiling(one, max(0.0, cores - (
                   one.other_cpu_cores + two.other_cpu_cores) / 2)),
               "load_generator": args.load_generator,
               "phases": [asdict(one), asdict(two)]}
        rows.append(row)
        out.append(f"{mode:6} {row['throughput_ratio_w2_vs_w1']:>10.2f} "
                   f"{row['cpu_per_request_ratio_w2_vs_w1']:>14.2f} "
                   f"{row['ceiling_w2_vs_w1']:>14.2f} {row['ceiling_w2_vs_w1_now']:>12.2f}")
        ok = row["throughput_ratio_w2_vs_w1"] >= WORKERS_THROUGHPUT_GOAL
        verdicts.append(f"{'PASS' if ok else 'FAIL'}  {mode:6} two workers serve "
                        f"{row['throughput_ratio_w2_vs_w1']:.2f}x one worker (goal >= "
                        f"{WORKERS_THROUGHPUT_GOAL}x; at most {row['ceiling_w2_vs_w1']:.2f}x "
                        f"on a quiet machine, {row['ceiling_w2_vs_w1_now']:.2f}x with what "
                        "the rest used), at "
                        f"{row['cpu_per_request_ratio_w2_vs_w1']:.2f}x its CPU per "
                        "request (goal: 1.00x)")
    out += [
        "(CPU ms/req: supervisor and workers; upstream, loadgen: the upstream's and "
        "the load generator's CPU per request; harness %: their share of the CPU the three "
        "spent; others: cores the rest of the machine used meanwhile (noise); sync msg/req, "
        "B/req: statesync messages and bytes the workers sent each other per request; "
        "ceiling: what two workers can serve over one at most, given those costs, with every "
        "process on at most one core: min(2/P, 1/U, 1/L, cores/(P+U+L)) / min(1/P, ...), "
        "quiet: all cores free, now: the cores the rest of the machine left free)", ""]
    if args.load_generator != "wrk":
        out.append("note: the load generator is this Python process (--load-generator "
                   "aiohttp, or wrk not on PATH: apt-get install wrk); it costs about what a "
                   "worker does per request, so it, not skyroute, caps the ratio")
    out += verdicts
    print("\n".join(out), flush=True)
    return rows


def start_skyroute(procs: Procs, args: argparse.Namespace, config: Path, name: str, *,
                   workers: int, core: int | None) -> Target:
    """``skyroute run --workers N`` on ``config``; the Target measures all its processes."""
    log = procs.tmp / f"{name}.log"
    # Below info, skyroute does not log its URL: give it a free port instead of 0.
    port = None if args.skyroute_log_level in ("debug", "info") else free_port()
    with log.open("wb") as log_file:
        sky = procs.spawn(name, [
            *shlex.split(args.skyroute_cmd), "--log-format", "json", "--log-level",
            args.skyroute_log_level, "run", "-c", str(config), "--port", str(port or 0),
            "--grace", "1", "--workers", str(workers)], core=core,
            stdout=subprocess.DEVNULL, stderr=log_file)
    url = wait_for_listening(sky, log, port,
                             "server_started" if workers == 1 else "workers_started")
    if workers > 1:  # the port answers once the first worker listens: until every one is up
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and not (
                len(worker_pids(sky.pid)) == workers and all(
                    listens(pid, url) for pid in worker_pids(sky.pid))):
            time.sleep(0.05)
    pids = (sky.pid, *worker_pids(sky.pid)) if workers > 1 else (sky.pid,)
    return Target(name, url + "/v1/chat/completions", CLIENT_KEY, "chat", pids)


def check_alive(procs: Procs) -> None:
    for name, proc in procs.procs:
        if proc.poll() is not None and name not in procs.stopped:
            raise RuntimeError(f"{name} died during the run (status {proc.returncode})")


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=6000,
                    help="max measured requests per phase (default 6000)")
    ap.add_argument("--seconds", type=float, default=6.0,
                    help="max measured seconds per phase (default 6)")
    ap.add_argument("--warmup", type=float, default=1.0,
                    help="warm-up seconds per phase, not measured (default 1)")
    ap.add_argument("--warmup-requests", type=int, default=500,
                    help="max warm-up requests per phase (default 500)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds per (mode, concurrency); each gives every target 1/rounds of "
                         "the budget in turn (default 3)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 64],
                    help="concurrency levels (default 1 64)")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                    help="json (non-streaming) and/or stream (default both)")
    ap.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS),
                    help="targets to measure (default all; the summary needs all three)")
    ap.add_argument("--tokens", type=int, default=5, help="tokens per answer (default 5)")
    ap.add_argument("--skyroute-cmd",
                    default=f"{shlex.quote(sys.executable)} -m skyroute.proxy.cli",
                    help="command that runs skyroute's CLI (default: this Python, "
                         "-m skyroute.proxy.cli, with the repo on PYTHONPATH)")
    ap.add_argument("--skyroute-log-level", default="info",
                    choices=["debug", "info", "warning", "error"],
                    help="skyroute --log-level (default info: one access line per request, "
                         "as in production)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    ap.add_argument("--no-scaling", dest="scaling", action="store_false",
                    help="skip the --workers 1 / --workers 2 comparison")
    ap.add_argument("--only-scaling", action="store_true",
                    help="only the --workers 1 / --workers 2 comparison")
    ap.add_argument("--load-generator", choices=["auto", "wrk", "aiohttp"], default="auto",
                    help="load generator of the scaling part: wrk (a C program that costs "
                         "little per request) or this Python process (aiohttp, which costs "
                         "about what a worker does and so caps the ratio); default auto: wrk "
                         "if on PATH")
    ap.add_argument("--scaling-upstream", choices=["canned", "standin"], default="canned",
                    help="upstream of the scaling part: the stand-in's answers recorded and "
                         "replayed by a bare asyncio protocol (bench/_canned_upstream.py, "
                         "like nginx with a static answer; default), or the stand-in itself "
                         "(aiohttp: a quarter of a worker's CPU per request)")
    ap.add_argument("--short", action="store_true",
                    help="a quick run for CI: 400 requests / 1 s per phase, one round, "
                         "concurrency 1 and 16")
    args = ap.parse_args(argv)
    if args.load_generator == "auto":
        args.load_generator = "wrk" if shutil.which("wrk") else "aiohttp"
    if args.short:
        args.requests, args.seconds, args.rounds = 400, 1.0, 1
        args.warmup, args.warmup_requests, args.concurrency = 0.3, 100, [1, 16]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cpus = os.sched_getaffinity(0)
    pinned = {LOAD_CORE, PROXY_CORE} <= cpus and shutil.which("taskset") is not None
    if pinned:
        os.sched_setaffinity(0, {LOAD_CORE})  # the upstream inherits core 0 too
    else:
        print("warning: cannot pin to cores 0 and 1 (need 2 CPUs and taskset); unpinned",
              file=sys.stderr)
    procs = Procs()
    # Turn SIGTERM into an exception so that `finally` stops the children.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    try:
        up = procs.spawn("upstream", [sys.executable, str(HERE / "_upstream.py"), UPSTREAM_KEY,
                                      str(args.tokens)], core=None, stdout=subprocess.PIPE)
        upstream_url = read_url_line(up, "upstream")
        bare = procs.spawn("bare", [sys.executable, str(HERE / "_passthrough.py"), upstream_url,
                                    UPSTREAM_KEY], core=PROXY_CORE if pinned else None,
                           stdout=subprocess.PIPE)
        bare_url = read_url_line(bare, "bare pass-through")
        config = procs.tmp / "routing.yaml"
        config.write_text(routing_yaml(upstream_url))
        sky = start_skyroute(procs, args, config, "skyroute", workers=1,
                             core=PROXY_CORE if pinned else None)
        path = "/v1/chat/completions"
        print(f"upstream {upstream_url} (pid {up.pid}); bare pass-through {bare_url} "
              f"(pid {bare.pid}); skyroute {sky.url.removesuffix(path)} (pid {sky.pids[0]})",
              file=sys.stderr)
        path = "/chat/completions"  # the upstream's base URL ends in /v1 already
        targets = [
            Target("direct", upstream_url + path, UPSTREAM_KEY, "deepseek-chat", ()),
            Target("bare", bare_url + "/v1" + path, UPSTREAM_KEY, "deepseek-chat", (bare.pid,)),
            sky,
        ]
        targets = [t for t in targets if t.name in args.targets]
        idle = {t.name: memory_mib(t.pids, "VmRSS") for t in targets}
        phases: list[Phase] = []
        result: dict[str, Any] = {}
        if not args.only_scaling:
            phases = uvloop.run(measure(targets, args))
            check_alive(procs)
            result = report(phases, args)
            print(memory_line(targets, idle), flush=True)
        scaled: list[ScalingPhase] = []
        if args.scaling:
            # Nothing pinned from here on: every process may use every core.
            os.sched_setaffinity(0, cpus)
            os.sched_setaffinity(up.pid, cpus)
            procs.stop_one("skyroute")
            procs.stop_one("bare")
            scaling_up, scaling_config = up, config
            if args.scaling_upstream == "canned":
                answers = procs.tmp / "answers.json"
                record_answers(upstream_url, answers)
                scaling_up = procs.spawn("canned", [sys.executable,
                                                    str(HERE / "_canned_upstream.py"),
                                                    str(answers)],
                                         core=None, stdout=subprocess.PIPE)
                scaling_config = procs.tmp / "routing-canned.yaml"
                scaling_config.write_text(routing_yaml(read_url_line(scaling_up, "canned")))
            scaling = [start_skyroute(procs, args, scaling_config, name, workers=n, core=None)
                       for name, n in zip(SCALING_TARGETS, (1, 2), strict=True)]
            idle = {t.name: memory_mib(t.pids, "VmRSS") for t in scaling}
            scaled = measure_scaling(scaling, scaling_up.pid, args, procs.tmp)
            check_alive(procs)
            result["scaling"] = report_scaling(scaled, args)
            print(memory_line(scaling, idle), flush=True)
        if args.json:
            result["config"] = {k: v for k, v in vars(args).items() if k != "json"}
            result["pinned"] = pinned
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
            print(f"\nresults written to {args.json}")
        return 1 if any(p.errors for p in [*phases, *scaled]) else 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        procs.stop()


if __name__ == "__main__":
    sys.exit(main())
